"""Configuration of the edge agent service: TOML file, then environment, then explicit overrides.

Precedence (later wins): built-in defaults < TOML file < ``MEGACE_EDGE__<SECTION>__<KEY>=value``
environment variables (``MEGACE_EDGE__SITE=s1`` for top-level keys) < the ``overrides`` dict.
Environment values are parsed as TOML literals (``4``, ``true``, ``0.5``, ``"x"``, ``[1, 2]``) and
fall back to plain strings, so ``MEGACE_EDGE__BROKER=mqtt://h:1883`` needs no quoting.

The loop launcher writes config files, so :meth:`EdgeConfig.to_toml` emits a file that
:func:`load_edge_config` reads back to an equal config.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from broker import topics
from broker.address import BrokerAddress
from broker.errors import TopicError
from edge_agent.training.toy_task import toy_config
from megace_common.configfile import deep_merge, dump_toml, load_layers
from megace_common.durable import atomic_write
from megace_common.trust import SigningConfig
from megace_model.config import EdgeModelConfig
from megace_model.errors import ConfigError

ENV_PREFIX = "MEGACE_EDGE__"
_SECTIONS = ("model", "training", "limits", "signing")
_ZERO_IS_NONE = frozenset({"steps", "epochs", "replay_max_per_device", "replay_max_per_modality",
                           "replay_max_bytes_per_device"})
"""Optional ints: TOML has no null, so 0 stands for "none" (no cap, not this mode)."""


class EdgeConfigError(ValueError):
    """The service configuration is unreadable or inconsistent (raised at start, never at run time)."""


@dataclass
class TrainingConfig:
    """When and how local rounds run, and what is shared upward."""

    min_new_samples: int = 64
    """A round starts once this many new labelled samples arrived since the last one ..."""
    interval_s: float = 60.0
    """... or this long after the last round, if at least one new sample arrived."""
    steps: int | None = 20
    """Optimizer steps per round; set ``epochs`` instead (and ``steps`` to 0/None) for passes over the buffer."""
    epochs: int | None = None
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.01
    holdout_every: int = 5
    share_personal: bool = False
    """Baseline "no personalization": personal tensors are uploaded and replaced by the global's too."""
    local_only: bool = False
    """Baseline "local only": never upload, ignore globals and site feedback."""
    defer_global: bool = False
    """Keep serving the site-tuned adapter; a global (or site view) becomes the start of the next round
    (``Trainer(defer_global=...)``; reports/experiment-fleet.md)."""
    adaptive_mix: bool = False
    """With ``defer_global``: a round starts from the mix of the fleet's model and the site's own that does best
    on the held-out samples (``edge_agent/training/adaptive_mix.py``; with ``share_personal`` the personal part
    is mixed too: reports/experiment-fleet.md, ``fedit-ala``)."""
    upload_fp16: bool = False
    startup_grace_s: float = 2.0
    """Before the first round, wait this long for the broker's retained global adapter."""
    torch_threads: int = 0
    """``torch.set_num_threads`` for the process; 0 leaves torch's default."""
    device: str = "auto"
    """``auto`` (CUDA when present), ``cpu`` or ``cuda[:n]``."""
    inference_process: bool = False
    """Serve predictions from a child process (``edge_agent/inference_process.py``): its own interpreter and
    ``inference_threads`` torch threads, so a prediction does not wait for the training thread's hold on
    Python's interpreter lock. Costs a second copy of the base model and a few seconds at start."""
    inference_threads: int = 1
    onnx: str = "auto"
    """ONNX at the edge (``edge_agent/onnx_serving.py``): after each round and applied global, export the
    merged personalized model to ``<state_dir>/export/model.onnx`` and check its parity. ``auto`` serves it
    when onnxruntime's measured batch-1 latency beats torch's, ``on`` whenever parity holds, ``off`` never
    exports."""
    onnx_parity_tol: float = 1e-4
    """Largest max-abs difference of the probabilities, onnxruntime vs torch, on held-out samples."""
    onnx_threads: int = 1
    """onnxruntime intra-op threads (one beat two on a loaded 2-core box)."""
    onnx_min_interval_s: float = 10.0
    """Fewest seconds from one export to the next. Tracing holds the interpreter lock (0.3 s tiny, 1.2 s MiniLM),
    which delays predictions served from a thread; a round closer than this keeps torch serving, with the newest
    weights, until the next export (counted as ``onnx_deferred``). 0: export after every round and global."""


@dataclass
class LimitsConfig:
    """Every queue and buffer is bounded; these are the bounds."""

    mqtt_queue: int = 100_000
    """aiomqtt's incoming queue. A message beyond it is dropped (``mqtt_dropped``) and, since the edge
    acknowledges only what it logged, not acknowledged: the broker delivers it again after the next
    reconnect. Mosquitto 2.0.11 does not hold deliveries to ``max_inflight_messages`` once
    acknowledgements flow, so under overload this queue is what bounds the edge's memory (about 1 KB a
    record); measured at 10,000 records/s offered, 10,000 overflowed within 9 s."""
    infer_queue: int = 256
    """Pending inference requests; when full, new ones get an ErrorReport ``busy``."""
    infer_batch: int = 32
    downlink_queue: int = 2048
    """Replies waiting for the broker (configs, errors, predictions, feedback); overflow is counted."""
    downlink_window: int = 32
    """Downlinks awaiting their PUBACK at once; the MQTT client's in-flight limit is set to match, so a
    burst waits in the downlink queue (bounded, counted) instead of piling up inside paho."""
    max_payload: int = 64 * 1024 * 1024
    """Largest reassembled incoming payload (global adapters are the big ones)."""
    max_array_bytes: int = 4 * 1024 * 1024
    """Largest single feature array."""
    max_packet: int = 256 * 1024
    """Uploads larger than this are chunked."""
    model_push_max_bytes: int = 32 * 1024 * 1024
    """The largest ONNX model sent to devices that ask for one (``model_push.skipped.too_large`` above it): each
    device gets its own signed, chunked copy through the downlink queue (a MiniLM model is about 49 MB)."""
    max_devices: int = 10_000
    device_idle_evict_s: float = 900.0
    """A full registry evicts the least recently seen device that sent no data for this long (counted as
    ``devices_evicted``) instead of refusing every newcomer; only when none qualifies is a newcomer refused."""
    max_modality_elements: int = 65_536
    """Largest array (elements) a registration may announce for one modality."""
    max_sequence_factor: int = 4
    """A registered token sequence may be at most this many times the model's ``max_tokens`` long
    (the model keeps only the last ``max_tokens`` tokens; longer is waste, ``[10**6, 6]`` is an attack)."""
    replay_max_total: int = 4096
    replay_max_per_device: int | None = 1024
    replay_max_per_modality: int | None = None
    replay_max_bytes: int = 256 * 1024 * 1024
    """Bytes of samples the replay buffer holds (float32 arrays); the oldest are dropped beyond
    (``dropped.bytes``). Also bounds the checkpoint written at shutdown."""
    replay_max_bytes_per_device: int | None = 64 * 1024 * 1024
    """One device's share of those bytes: a device sending its largest allowed arrays cannot crowd out
    the others (``dropped.device_bytes:<id>``)."""
    error_downlinks_per_s: float = 2.0
    """Error reports sent back to one device per second (burst: ``error_downlink_burst``); the rest of a
    flood of bad input is counted (``errors_suppressed``) and not answered. 0 = no error downlinks."""
    error_downlink_burst: int = 10
    max_pending_uploads: int = 8
    """Uploads kept for (re)publishing while the broker is unreachable; the oldest is dropped beyond."""
    shutdown_flush_s: float = 5.0
    ingest_max_lag_bytes: int = 64 * 1024 * 1024
    """``ingest_receiver = "process"``: logged bytes the agent may lag behind its receiver; beyond, the receiver
    holds acknowledgements and the broker stops sending (its in-flight window) until the agent catches up."""


@dataclass
class EdgeConfig:
    """The whole service configuration."""

    site: str = "site-0"
    edge_id: str = "edge-0"
    broker: str = "mqtt://127.0.0.1:1883"
    state_dir: str = "./state/edge"
    metrics_interval_s: float = 2.0
    persistent_session: bool = True
    """MQTT clean_session=False: the broker queues device records while the agent restarts."""
    ingest_fsync: bool = True
    """fsync the ingest log before acknowledging device messages (survives power loss); ``false`` only
    writes to the OS, which survives a crash or ``kill -9`` of the agent but not of the machine."""
    ingest_receiver: str = field(default_factory=lambda: os.environ.get(f"{ENV_PREFIX}INGEST_RECEIVER", "auto"))
    """Where device data is received, logged and acknowledged: ``process``: a receiver process
    (:mod:`edge_agent.receiver`) on its own core holds the data session (client id ``megace-edge-<id>``) and the
    agent reads its log, answering inference requests on a second connection (``megace-ctl-<id>``); ``inline``:
    on the agent's event loop, one connection. ``auto`` (default): ``process``, unless the edge logs in as an
    identity and has no ``control_identity`` for the second connection (then ``inline``).
    The default honours ``MEGACE_EDGE__INGEST_RECEIVER`` even where a config is built in code (tests run both)."""
    control_identity: str = ""
    """An edge that logs in as an identity (secure set-up) with a receiver process: the folder of its control
    identity, ``megace-ctl-<edge_id>/`` as ``megace provision edge`` writes it beside the edge's. The agent's own
    connection logs in with it; on a broker that makes the username the client id, one login for both
    connections would have each take the other's session."""
    log_level: str = "INFO"
    receipts: bool = True
    """Send each device ``receipt`` downlinks (``edge_agent/receipts.py``): which of its records the ingest log
    holds, so the device keeps and re-sends what a broker acknowledged and then lost. Announced in the config
    downlink; ``false`` behaves as edges did before (devices forget a record once the broker acknowledged it)."""
    receipt_interval_s: float = 0.2
    """At most one receipt per device this often (coalesced); each follows the ingest-log commit it reports."""
    inference_workers: int = 0
    """Extra processes answering this site's prediction requests beside the edge (``edge_agent/infer_worker.py``),
    started once the broker accepted MQTT 5 (broker URL ``?protocol=auto`` or ``5``): they and the edge share
    the request topic through a shared subscription. On MQTT 3.1.1 none start and the edge serves alone."""
    infer_group: str = ""
    """The shared-subscription group of the request topic; empty: ``megace-infer-<site>``."""
    shared_inference: bool | None = None
    """Whether the edge takes its requests through the group on MQTT 5: None (default) when
    ``inference_workers`` > 0; true for workers started on their own (``megace infer``). Not by default: a
    group member's durable session keeps getting its share while offline (an edge replaced under a new id on
    Mosquitto left half of its site's requests unanswered)."""
    worker_identities: str = ""
    """An edge that logs in as an identity (secure set-up): the folder holding its workers' identity folders,
    ``megace-infer-<edge_id>-w<n>/`` as ``megace provision workers`` writes them (credentials, signing key,
    the edge's grant). Each worker logs in and signs as its own; empty: such an edge starts no worker."""
    model: EdgeModelConfig = field(default_factory=toy_config)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    signing: SigningConfig = field(default_factory=SigningConfig)
    """``key_file``: this edge's Ed25519 key (signs uploads and device downlinks); ``trusted_keys``: the
    cloud's public key(s), pinned: globals and site feedback must carry a valid signature by one."""

    def __post_init__(self) -> None:
        self.validate()

    @property
    def address(self) -> BrokerAddress:
        return BrokerAddress.from_url(self.broker)

    @property
    def receiver_process(self) -> bool:
        """Whether a receiver process holds the data session (``ingest_receiver``, ``auto`` resolved)."""
        if self.ingest_receiver == "auto":
            return bool(self.control_identity) or not self.address.identified
        return self.ingest_receiver == "process"

    @property
    def control_address(self) -> BrokerAddress:
        """How the agent's own connection logs in: as the edge, or beside a receiver process that holds the edge's
        login, as its control identity (``control_identity``)."""
        if self.receiver_process and self.control_identity:
            return self.address.logged_in_as(self.control_identity)
        return self.address

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)

    @property
    def joins_infer_group(self) -> bool:
        """On MQTT 5: take the site's requests through the shared group (see ``shared_inference``)."""
        return self.inference_workers > 0 if self.shared_inference is None else self.shared_inference

    def validate(self) -> None:
        try:
            topics.check_id(self.site, "site")
            topics.check_id(self.edge_id, "edge_id")
            BrokerAddress.from_url(self.broker)
        except (TopicError, ValueError) as exc:
            raise EdgeConfigError(str(exc)) from exc
        t = self.training
        if t.steps and t.epochs:
            raise EdgeConfigError("training: give steps or epochs, not both")
        if t.min_new_samples < 1 or t.batch_size < 1 or t.interval_s <= 0:
            raise EdgeConfigError("training: min_new_samples, batch_size >= 1 and interval_s > 0")
        if t.inference_threads < 1 or t.onnx_threads < 1:
            raise EdgeConfigError("training.inference_threads and training.onnx_threads must be >= 1")
        if t.onnx not in ("auto", "off", "on") or not t.onnx_parity_tol >= 0 or not t.onnx_min_interval_s >= 0:
            raise EdgeConfigError("training.onnx must be auto, off or on; training.onnx_parity_tol and "
                                  "onnx_min_interval_s >= 0")
        if t.share_personal and t.local_only:
            raise EdgeConfigError("training: share_personal and local_only exclude each other")
        if t.adaptive_mix and not t.defer_global:
            raise EdgeConfigError("training: adaptive_mix needs defer_global (the mix starts the next round)")
        lim = self.limits
        for name in ("mqtt_queue", "infer_queue", "infer_batch", "downlink_queue", "max_devices",
                     "replay_max_total", "max_pending_uploads", "replay_max_bytes", "error_downlink_burst",
                     "downlink_window", "model_push_max_bytes"):
            if getattr(lim, name) < 1:
                raise EdgeConfigError(f"limits.{name} must be >= 1")
        if lim.error_downlinks_per_s < 0:
            raise EdgeConfigError("limits.error_downlinks_per_s must be >= 0")
        if self.metrics_interval_s <= 0:
            raise EdgeConfigError("metrics_interval_s must be > 0")
        if not self.receipt_interval_s >= 0:
            raise EdgeConfigError("receipt_interval_s must be >= 0")
        if self.inference_workers < 0:
            raise EdgeConfigError("inference_workers must be >= 0")
        if self.infer_group:
            try:
                topics.check_id(self.infer_group, "infer_group")
            except TopicError as exc:
                raise EdgeConfigError(str(exc)) from exc
        if self.ingest_receiver not in ("auto", "inline", "process") or lim.ingest_max_lag_bytes < 1:
            raise EdgeConfigError("ingest_receiver must be auto, inline or process; limits.ingest_max_lag_bytes >= 1")
        if self.ingest_receiver == "process" and self.address.identified and not self.control_identity:
            raise EdgeConfigError("ingest_receiver = process with an identity's login needs control_identity (the "
                                  "megace-ctl-<edge_id> folder of megace provision edge): one login for the receiver "
                                  "and the agent would have each take the other's session")
        if self.control_identity:
            try:
                self.address.logged_in_as(self.control_identity)
            except OSError as exc:
                raise EdgeConfigError(f"control_identity {self.control_identity}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (what the TOML holds; ``None`` values are left out)."""
        top = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _SECTIONS}
        return {
            **top,
            "model": self.model.to_dict(),
            "training": _none_as_zero(asdict(self.training)),
            "limits": _none_as_zero(asdict(self.limits)),
            "signing": asdict(self.signing),
        }

    def to_toml(self) -> str:
        """A TOML document that :func:`load_edge_config` reads back to an equal config."""
        return dump_toml(self.to_dict())

    def write(self, path: str | Path) -> Path:
        """Write :meth:`to_toml` to ``path`` atomically (the launcher may start the agent right after)."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, self.to_toml().encode())
        return target

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EdgeConfig:
        """Build from a nested dict; unknown keys are errors (typos must not silently fall back)."""
        data = dict(data)
        try:
            model = _model_from(data.pop("model", None))
            train_data = dict(data.pop("training", {}) or {})
            if train_data.get("epochs") and "steps" not in train_data:
                train_data["steps"] = None  # asking for epochs means "not the default steps"
            training = _section(TrainingConfig, train_data, "training")
            limits = _section(LimitsConfig, data.pop("limits", {}), "limits")
            signing = _section(SigningConfig, data.pop("signing", {}), "signing")
            top = _section(cls, data, "top level", skip=_SECTIONS, build=False)
            return cls(**top, model=model, training=training, limits=limits, signing=signing)
        except ConfigError as exc:
            raise EdgeConfigError(f"model: {exc}") from exc


def _none_as_zero(section: dict[str, Any]) -> dict[str, Any]:
    return {k: (0 if v is None and k in _ZERO_IS_NONE else v) for k, v in section.items()}


def _model_from(data: Any) -> EdgeModelConfig:
    if data is None:
        return toy_config()
    if not isinstance(data, Mapping):
        raise EdgeConfigError("[model] must be a table")
    base = toy_config().to_dict()
    merged = {**base, **dict(data)}
    return EdgeModelConfig.from_dict(merged)


def _section(cls: Any, data: Any, where: str, *, skip: tuple[str, ...] = (), build: bool = True) -> Any:
    if not isinstance(data, Mapping):
        raise EdgeConfigError(f"{where} must be a table")
    known = {f.name for f in fields(cls)} - set(skip)
    unknown = sorted(set(data) - known)
    if unknown:
        raise EdgeConfigError(f"unknown key(s) in {where}: {unknown}")
    values = {k: (None if v == 0 and k in _ZERO_IS_NONE else v) for k, v in data.items()}
    return cls(**values) if build else values


def load_edge_config(
    path: str | Path | None, overrides: Mapping[str, Any] | None = None, *, environ: Mapping[str, str] | None = None
) -> EdgeConfig:
    """Defaults < TOML ``path`` (if given) < environment < ``overrides``; raises ``EdgeConfigError``.

    The layering is :func:`megace_common.configfile.load_layers`, shared with the cloud.
    """
    data = load_layers(path, ENV_PREFIX, overrides, environ=environ, error=EdgeConfigError, what="edge config")
    try:
        return EdgeConfig.from_dict(data)
    except TypeError as exc:
        raise EdgeConfigError(str(exc)) from exc


__all__ = [
    "EdgeConfig", "EdgeConfigError", "LimitsConfig", "TrainingConfig", "deep_merge", "dump_toml", "load_edge_config",
]
