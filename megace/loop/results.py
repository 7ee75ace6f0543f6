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
    """One inference request, split into legs (seconds); legs are None where the stamps cannot place the split.

    Every stamp is ``time.monotonic()`` in the loop's process: the device's send and receive and the tap's
    sightings of the request and of the answer. The answer reaches the broker's subscribers no later than the
    first of them has it, so the split point for the downlink is the earlier of the tap's sighting and the
    device's receipt (on loopback the two differ only by thread scheduling). The legs are differences of
    consecutive stamps, so they add up to ``e2e``; they are kept only when the stamps are in causal order (a tap
    thread scheduled late can see the request after the device already had the answer: then the split is
    unknown, not negative).
    """

    edge: str
    e2e: float
    uplink: float | None  # device send -> the tap sees the request (device -> broker -> subscribers)
    edge_time: float | None  # the tap sees the request -> the answer reaches subscribers (queue, inference, publish)
    downlink: float | None  # the answer reaches subscribers -> the device has it
    device: str = ""
    request: int = -1
    round: int = 0

    @classmethod
    def from_stamps(cls, edge: str, sent: float, received: float, request_seen: float | None = None,
                    answer_seen: float | None = None, **ids: Any) -> LatencySample:
        """Split ``received - sent`` at the tap's stamps when they fall, in order, inside the round trip."""
        e2e = received - sent
        if request_seen is None or answer_seen is None:
            return cls(edge, e2e, None, None, None, **ids)
        answer_out = min(answer_seen, received)
        if not sent <= request_seen <= answer_out <= received:
            return cls(edge, e2e, None, None, None, **ids)
        return cls(edge, e2e, request_seen - sent, answer_out - request_seen, received - answer_out, **ids)

    @property
    def split(self) -> bool:
        return self.uplink is not None and self.edge_time is not None and self.downlink is not None


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
    security: dict[str, Any] = field(default_factory=dict)  # how the bus was secured (or that it was not)

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
