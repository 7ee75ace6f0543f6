"""What one closed-loop run is made of: the knobs of ``megace run`` and of each experiment arm."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

#: LoRA ranks handed to edges in order (cycled): heterogeneous on purpose, as real edges differ.
DEFAULT_RANKS: tuple[int, ...] = (8, 4, 2)

#: Per-dataset defaults that keep a run to a few minutes on a 2-core CPU box.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "basicmotions": {"options": {"augment": 5}, "max_samples": None},
    "digits-av": {"options": {}, "max_samples": 900},
}


@dataclass
class LoopSettings:
    """One closed loop: dataset and partition, the edges' models and training, the cloud's rule, the bus."""

    dataset: str = "basicmotions"
    dataset_options: dict[str, Any] | None = None  # None: DATASET_DEFAULTS
    max_samples: int | None = -1  # -1: DATASET_DEFAULTS; None: everything
    edges: int = 3
    devices_per_edge: int = 2
    alpha: float = 0.5
    seed: int = 0
    modality_sets: list[tuple[str, ...]] | None = None  # None: edge 0 all, others one each
    # model
    backbone: str = "tiny"
    ranks: tuple[int, ...] = DEFAULT_RANKS
    lora_alpha_per_rank: float = 2.0  # lora_alpha = 2 r keeps alpha/r constant across ranks
    contrastive_weight: float = 0.1
    # training at the edge
    steps_per_round: int = 12
    batch_size: int = 32
    lr: float = 3e-3
    share_personal: bool = False  # no-personalization baseline: the personal part is uploaded and averaged too
    local_only: bool = False  # local-only baseline: nothing goes to the cloud
    upload_fp16: bool = False
    # cloud
    strategy: str = "modality-aware"
    # schedule
    rounds: int = 5
    stream_rounds: int | None = None  # the train data arrives over this many rounds (None: all of them)
    time_limit_s: float = 600.0
    round_timeout_s: float = 120.0
    # bus
    broker_url: str | None = None  # None: start the embedded broker
    broker_kind: str = "embedded"  # "embedded" | "mosquitto" (when the loop starts its own)
    ws_port: int | None = None  # MQTT over WebSockets here for the dashboard: ws:// (embedded), wss:// (secure)
    ca_file: str | None = None
    username: str | None = None
    password: str | None = None
    secure: bool = False  # a private Mosquitto with TLS, per-role identities, ACLs and signatures (megace.loop.secure)
    state_dir: Path | None = None  # secure: the provisioning folder (None: a temporary one, removed after the run)
    late_edges: bool = False  # devices connect and register before the edges start (edges must ask them again)
    # output
    out: Path | None = None
    label: str = ""
    global_eval: bool = True  # after the last round, every edge also answers the whole test set
    services_timeout_s: float = 180.0
    extra_edge: dict[str, Any] = field(default_factory=dict)
    extra_cloud: dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> LoopSettings:
        """A copy with the dataset defaults filled in (so reports show what really ran)."""
        d = DATASET_DEFAULTS.get(self.dataset, {"options": {}, "max_samples": None})
        return replace(
            self,
            dataset_options=dict(d["options"]) if self.dataset_options is None else dict(self.dataset_options),
            max_samples=d["max_samples"] if self.max_samples == -1 else self.max_samples,
        )

    def rank_of(self, edge: int) -> int:
        return int(self.ranks[edge % len(self.ranks)])

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["out"] = str(self.out) if self.out else None
        out["state_dir"] = str(self.state_dir) if self.state_dir else None
        out["password"] = "***" if self.password else None
        return out
