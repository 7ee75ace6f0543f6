"""What a loop run measured, round by round, in a form that serializes to JSON for reports and experiments."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class EdgeRound:
    """One edge after one round: accuracy measured at its devices plus what the edge itself reported."""

    edge: str
    rank: int
    modalities: list[str]
    device_acc: float  # personalized: the edge's devices' own test samples, answered over the bus
    answered: int
    asked: int
    latency_ms_p50: float
    latency_ms_p95: float
    heldout_acc: float | None = None
    train_acc: float | None = None
    global_version: int | None = None
    edge_round: int | None = None
    bytes_up: float | None = None  # cumulative adapter bytes edge -> cloud, measured on the bus
    bytes_down: float | None = None  # cumulative bytes cloud -> this edge (global broadcast + site feedback)


@dataclass
class RoundRecord:
    round: int
    elapsed_s: float
    global_version: int | None
    edges: list[EdgeRound]
    cloud: dict[str, Any] = field(default_factory=dict)

    @property
    def mean_acc(self) -> float:
        accs = [e.device_acc for e in self.edges if not math.isnan(e.device_acc)]
        return statistics.fmean(accs) if accs else math.nan


@dataclass
class LatencySample:
    """One inference request, split into legs (seconds); legs are None where the tap missed a message."""

    edge: str
    e2e: float
    uplink: float | None
    edge_time: float | None
    downlink: float | None


@dataclass
class LoopResult:
    settings: dict[str, Any]
    rounds: list[RoundRecord]
    latency: list[LatencySample] = field(default_factory=list)
    global_acc: dict[str, float] = field(default_factory=dict)  # edge -> accuracy on the whole test set
    params: dict[str, dict[str, int]] = field(default_factory=dict)  # edge -> parameter counts
    uploads: list[dict[str, Any]] = field(default_factory=list)  # every adapter upload seen on the bus
    label_skew: float = math.nan
    partition: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0
    stopped_because: str = ""
    out_dir: str = ""

    @property
    def final(self) -> RoundRecord | None:
        return self.rounds[-1] if self.rounds else None

    def to_json(self) -> dict[str, Any]:
        return _clean(asdict(self))

    def write(self, path: Path) -> Path:
        path.write_text(json.dumps(self.to_json(), indent=1))
        return path

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LoopResult:
        rounds = [RoundRecord(**{**r, "edges": [EdgeRound(**e) for e in r["edges"]]}) for r in data["rounds"]]
        latency = [LatencySample(**x) for x in data.get("latency", [])]
        rest = {k: v for k, v in data.items() if k not in ("rounds", "latency")}
        return cls(rounds=rounds, latency=latency, **rest)


def _clean(x: Any) -> Any:
    """NaN/inf become None so the JSON is standard."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x
