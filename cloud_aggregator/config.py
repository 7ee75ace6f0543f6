"""The cloud aggregator's configuration: TOML file, then environment, then explicit overrides.

Layering (later wins) lets one example file serve systemd (``/etc/megace/cloud.toml``), a
container (``MEGACE_CLOUD__AGGREGATION__BUFFER_K=5``) and the loop launcher (``overrides``)::

    cloud_id = "cloud"                  # top level: MEGACE_CLOUD__CLOUD_ID
    broker = "mqtt://127.0.0.1:1883"
    state_dir = "/var/lib/megace/cloud"
    [model]        # EdgeModelConfig fields: the frozen base every edge shares
    [aggregation]  # strategy, FedBuff buffer, staleness discount, server optimizer
    [validation]   # norm guard
    [limits]       # payload sizes, timers, threads
    [ledger]       # url = "" (sqlite in state_dir) or "postgresql://..." (replicas with a lease)

Environment values are parsed as TOML values when they parse (``5``, ``true``, ``{a = 1}``)
and taken as plain strings otherwise (``mqtt://host``).  Unknown keys are errors: a typo in a
production config must not silently fall back to a default.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from broker import topics
from broker.errors import TopicError
from megace_common.configfile import dump_toml, load_layers
from megace_model.config import EdgeModelConfig, ModalitySpec

from .trust import CloudSigningConfig

ENV_PREFIX = "MEGACE_CLOUD__"


class CloudConfigError(ValueError):
    """The configuration is missing a field, has an unknown key or an invalid value."""


@dataclass(frozen=True)
class AggregationConfig:
    """How updates become a new global version."""

    strategy: str = "fedavg"
    #: keyword arguments of the strategy, e.g. ``{inner = "hetlora"}`` for modality-aware
    strategy_options: dict[str, Any] = field(default_factory=dict)
    #: FedBuff: aggregate once this many updates are buffered ...
    buffer_k: int = 3
    #: ... or this many seconds after the window opened (0 = no timer)
    buffer_period_s: float = 0.0
    #: the timer fires only with at least this many buffered updates
    min_updates: int = 1
    #: staleness discount: "polynomial" ((1+s)^-a), "hinge" or "constant"
    discount: str = "polynomial"
    discount_options: dict[str, float] = field(default_factory=dict)
    #: FedBuff step: move the global only sum(discount*n)/sum(n) of the way to the aggregate, so a
    #: lone stale update cannot replace it (factor-space strategies; flora/flexlora ignore it)
    staleness_step: bool = True
    #: updates more than this many versions behind are rejected ("stale"); -1 = no limit
    max_staleness: int = 16
    #: server optimizer on the pseudo-gradient: "none", "sgd" (lr, momentum) or "fedadam"
    server_optimizer: str = "none"
    server_optimizer_options: dict[str, float] = field(default_factory=dict)
    #: no single contribution may weigh more than this share of a module's aggregate (1 = no cap); excess
    #: weight is handed to the others, so 10^12 claimed samples buy at most half of the round
    max_share: float = 0.5
    #: which site feedback carries the site's view as tensors: "needed" (only a view that is not a cut of the
    #: retained global, which the edge cuts itself; acknowledgements never) or "always" (every feedback, as before
    #: view cuts: 7N+1 adapter copies per round instead of 3N+1; for edges that predate them). See feedback.py
    feedback_tensors: str = "needed"


@dataclass(frozen=True)
class ValidationConfig:
    """Poisoning guards (see ``validation.py`` and ``admission.py`` for why each default is what it is)."""

    norm_guard: bool = True
    #: robust log-norm z-score bound (0 = off); with min_spread 0.5 the band is e^(4 x 0.5) = 7.4x the median
    z_max: float = 4.0
    #: bound on norm / median norm and its inverse (0 = off)
    ratio_max: float = 10.0
    #: floor of the robust log-norm scale: honest edges differ by rank/alpha/data (see NormGuard)
    min_spread: float = 0.5
    #: the statistical band is silent until this many norms were accepted (the absolute bound is not); 3 is one
    #: round of a 3-edge fleet, so a 15x update is judged from the second round on (5 let it through twice)
    min_history: int = 3
    window: int = 256
    #: absolute bound on an update's effective norm ||ΔW||_F, armed from the first upload (0 = derive it:
    #: max_norm_ratio x the Frobenius norm of the frozen base weights the adapter modifies)
    max_norm: float = 0.0
    max_norm_ratio: float = 10.0
    #: each LoRA A row is kept within this factor of the initial global's row scale, compensated in B so that
    #: ΔW is unchanged (0 = off); defeats "A x 10^4, B x 10^-4" against strategies that average A and B apart
    factor_band: float = 4.0
    #: sample counts above this are clipped (an upload's weight is what it claims; 0 = no clip); so are
    #: modality counts above the (clipped) sample count
    max_samples: int = 1_000_000
    #: each module's step from the current global's view is clipped to this many times the median of that
    #: module's recent accepted steps (0 = off; see ``steps.py``): a flipped or inflated adapter moves the
    #: global no further than an honest round does
    step_multiplier: float = 3.0
    #: before ``min_history`` steps of a module exist, its step is clipped to this many times ||W0||_F of the
    #: frozen base (0 = unbounded until then)
    step_cold_ratio: float = 1.0
    #: accepted steps per module the median is taken over
    step_window: int = 64
    #: provisioned sites; when set, uploads from any other site are refused ("unknown_site") with no feedback
    sites: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LimitsConfig:
    """Resource bounds and timers."""

    #: largest reassembled upload accepted
    max_payload_bytes: int = 64 * 1024 * 1024
    #: memory budget for chunked uploads in flight, and how many at once
    max_reassembly_bytes: int = 256 * 1024 * 1024
    max_transfers: int = 32
    chunk_timeout_s: float = 60.0
    #: packets larger than this are published chunked (brokers often cap at 1 MB / 128 KB)
    max_packet_bytes: int = 256 * 1024
    metrics_period_s: float = 5.0
    #: BLAS/LAPACK threads for aggregation (numpy's SVDs, matmuls); 1 leaves the other cores to the broker.
    #: The name predates the numpy port and is kept so existing configs stay valid.
    torch_threads: int = 1
    #: accepted seqs / rejections repeated in each site's feedback
    feedback_history: int = 32
    #: keep the tensors of only the last N globals (0 = keep all); ledger rows are always kept
    keep_globals: int = 0
    #: seconds a clean shutdown waits for the in-flight message or aggregation
    shutdown_grace_s: float = 10.0
    #: log lines per rejection reason per minute; the rest are counted and summarised (0 = none)
    reject_logs_per_minute: int = 10


@dataclass(frozen=True)
class LedgerConfig:
    """Where the ledger lives: sqlite in ``state_dir`` (default), or PostgreSQL shared by replicas (``ha.toml``)."""

    #: "" = sqlite under state_dir; ``postgresql://user@host:port/db``: the replicated ledger, one active replica
    #: at a time through a lease (see ``leader.py``); one database per cloud
    url: str = ""
    #: seconds between a standby's attempts to take the lease
    poll_s: float = 0.5
    #: seconds between the active replica's checks that it still holds the lease
    heartbeat_s: float = 1.0

    @property
    def replicated(self) -> bool:
        return bool(self.url)


@dataclass(frozen=True)
class CloudConfig:
    """Everything ``megace cloud`` needs; build it with :func:`load_cloud_config`."""

    model: EdgeModelConfig
    cloud_id: str = "cloud"
    broker: str = "mqtt://127.0.0.1:1883"
    state_dir: str = "/var/lib/megace/cloud"
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    signing: CloudSigningConfig = field(default_factory=CloudSigningConfig)
    ledger: LedgerConfig = field(default_factory=LedgerConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (TOML-ready), the inverse of :meth:`from_dict`."""
        out = {
            "cloud_id": self.cloud_id,
            "broker": self.broker,
            "state_dir": self.state_dir,
            "model": self.model.to_dict(),
            "aggregation": asdict(self.aggregation),
            "validation": asdict(self.validation),
            "limits": asdict(self.limits),
            "signing": asdict(self.signing),
            "ledger": asdict(self.ledger),
        }
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CloudConfig:
        data = dict(data)
        _no_unknown(data, {f.name for f in fields(cls)}, "top level")
        if "model" not in data:
            raise CloudConfigError("missing [model] section (the EdgeModelConfig every edge shares)")
        try:
            model = _model_config(data.pop("model"))
            sections = {
                name: _section(kind, data.pop(name, {}), name)
                for name, kind in (
                    ("aggregation", AggregationConfig),
                    ("validation", ValidationConfig),
                    ("limits", LimitsConfig),
                    ("signing", CloudSigningConfig),
                    ("ledger", LedgerConfig),
                )
            }
            cfg = cls(model=model, **sections, **data)
        except CloudConfigError:
            raise
        except (TypeError, ValueError) as exc:
            raise CloudConfigError(str(exc)) from exc
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Cheap consistency checks; strategy/optimizer names are checked when the service builds them."""
        a, lim = self.aggregation, self.limits
        try:
            topics.check_id(self.cloud_id, "cloud_id")
        except TopicError as exc:
            raise CloudConfigError(str(exc)) from None
        if a.buffer_k < 1 or a.min_updates < 1:
            raise CloudConfigError("aggregation.buffer_k and min_updates must be >= 1")
        if a.buffer_period_s < 0 or not math.isfinite(a.buffer_period_s):
            raise CloudConfigError("aggregation.buffer_period_s must be >= 0 (0 = no timer)")
        if lim.max_packet_bytes < 1024 or lim.max_payload_bytes < 1024:
            raise CloudConfigError("limits.max_packet_bytes and max_payload_bytes must be >= 1024")
        if lim.torch_threads < 1 or lim.metrics_period_s <= 0 or lim.feedback_history < 1:
            raise CloudConfigError("limits.torch_threads, metrics_period_s and feedback_history must be positive")
        if not 0 < a.max_share <= 1:
            raise CloudConfigError("aggregation.max_share must be in (0, 1]")
        if a.feedback_tensors not in ("needed", "always"):
            raise CloudConfigError("aggregation.feedback_tensors must be \"needed\" or \"always\"")
        v = self.validation
        if min(v.max_norm, v.max_norm_ratio, v.factor_band, v.max_samples, lim.reject_logs_per_minute,
               v.step_multiplier, v.step_cold_ratio) < 0 or v.step_window < 1:
            raise CloudConfigError(
                "validation bounds and limits.reject_logs_per_minute must be >= 0 (0 = off), step_window >= 1"
            )
        if 0 < v.factor_band < 1:
            raise CloudConfigError("validation.factor_band must be >= 1 (or 0 = off)")
        led = self.ledger
        if led.url and not led.url.startswith(("postgresql://", "postgres://")):
            raise CloudConfigError("ledger.url must be empty (sqlite in state_dir) or a postgresql:// URL")
        if not (led.poll_s > 0 and led.heartbeat_s > 0):
            raise CloudConfigError("ledger.poll_s and ledger.heartbeat_s must be > 0")


def load_cloud_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> CloudConfig:
    """File (optional), then ``MEGACE_CLOUD__<SECTION>__<KEY>`` variables, then ``overrides``.

    ``overrides`` is a nested dict (``{"aggregation": {"buffer_k": 2}}``) or uses dotted keys
    (``{"aggregation.buffer_k": 2}``).
    """
    data = load_layers(path, ENV_PREFIX, overrides, environ=environ, error=CloudConfigError, what="cloud config")
    return CloudConfig.from_dict(data)


def dumps_cloud_config(config: CloudConfig) -> str:
    """TOML text that :func:`load_cloud_config` reads back to an equal config."""
    return dump_toml(config.to_dict())


def write_cloud_config(config: CloudConfig, path: str | os.PathLike[str]) -> Path:
    """Write ``config`` as TOML (the loop launcher writes one file per cloud)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(dumps_cloud_config(config))
    return p


# ---- helpers -------------------------------------------------------------------------------


def _model_config(raw: Any) -> EdgeModelConfig:
    if isinstance(raw, EdgeModelConfig):
        return raw
    if not isinstance(raw, Mapping):
        raise CloudConfigError("[model] must be a table")
    raw = dict(raw)
    mods = raw.get("modalities")
    if not isinstance(mods, Mapping) or not mods:
        raise CloudConfigError("[model.modalities] must map modality names to {token_dim, max_tokens}")
    raw["modalities"] = {n: asdict(s) if isinstance(s, ModalitySpec) else dict(s) for n, s in mods.items()}
    try:
        return EdgeModelConfig.from_dict(raw)
    except ValueError as exc:  # edge_agent's ConfigError is a ValueError
        raise CloudConfigError(f"[model]: {exc}") from exc


def _section(kind: type, raw: Any, name: str) -> Any:
    if isinstance(raw, kind):
        return raw
    if not isinstance(raw, Mapping):
        raise CloudConfigError(f"[{name}] must be a table")
    _no_unknown(raw, {f.name for f in fields(kind)}, f"[{name}]")
    return kind(**raw)


def _no_unknown(raw: Mapping[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(raw) - known)
    if unknown:
        raise CloudConfigError(f"unknown key(s) {unknown} in {where}; known: {sorted(known)}")
