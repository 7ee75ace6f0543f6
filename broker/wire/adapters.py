"""Adapter traffic between edges and the cloud.

Tensors are keyed by peft state-dict names (``...lora_A.weight`` is ``(r, in)``,
``...lora_B.weight`` is ``(out, r)``). A tensor tied to one modality carries
``.modality_proj.<modality>.`` in its name; :func:`modality_of` reads it.
"""

from __future__ import annotations

import re
from dataclasses import field
from typing import TYPE_CHECKING, Any

from broker.compat import slotted_dataclass
from broker.errors import DecodeError
from broker.wire.arrays import decode_array, encode_array
from broker.wire.fields import body_map, count_map, get_float, get_int, get_list, get_map, get_str, number_map

if TYPE_CHECKING:
    import numpy as np

_MODALITY_TAG = re.compile(r"(?:^|\.)modality_proj\.([a-z][a-z0-9_]{0,31})\.")


def modality_of(tensor_name: str) -> str | None:
    """The modality a tensor belongs to, or None for modality-agnostic tensors."""
    m = _MODALITY_TAG.search(tensor_name)
    return m.group(1) if m else None


def encode_tensors(tensors: dict[str, np.ndarray]) -> dict[str, Any]:
    return {name: encode_array(arr) for name, arr in tensors.items()}


def decode_tensors(obj: Any, *, max_array_bytes: int | None = None) -> dict[str, np.ndarray]:
    if not isinstance(obj, dict):
        raise DecodeError("tensors must be a map of name to array")
    out: dict[str, np.ndarray] = {}
    for name, arr in obj.items():
        if not isinstance(name, str) or not name:
            raise DecodeError("tensor names must be non-empty strings")
        out[name] = decode_array(arr, max_bytes=max_array_bytes)
    return out


@slotted_dataclass()
class AdapterUpdate:
    """An edge's shared adapter after a local round, plus what the cloud needs to weigh it."""

    edge: str
    site: str
    seq: int
    base_version: int
    base_model: str
    rank: int
    alpha: float
    samples: int
    modalities: dict[str, int]
    tensors: dict[str, np.ndarray]
    metrics: dict[str, float] = field(default_factory=dict)

    def to_body(self) -> dict[str, Any]:
        return {
            "edge": self.edge,
            "site": self.site,
            "seq": int(self.seq),
            "base_version": int(self.base_version),
            "base_model": self.base_model,
            "rank": int(self.rank),
            "alpha": float(self.alpha),
            "samples": int(self.samples),
            "modalities": {k: int(v) for k, v in self.modalities.items()},
            "metrics": {k: float(v) for k, v in self.metrics.items()},
            "tensors": encode_tensors(self.tensors),
        }

    @classmethod
    def from_body(cls, body: Any) -> AdapterUpdate:
        b = body_map(body, "adapter")
        return cls(
            edge=get_str(b, "edge"),  # type: ignore[arg-type]
            site=get_str(b, "site"),  # type: ignore[arg-type]
            seq=get_int(b, "seq"),  # type: ignore[arg-type]
            base_version=get_int(b, "base_version"),  # type: ignore[arg-type]
            base_model=get_str(b, "base_model"),  # type: ignore[arg-type]
            rank=get_int(b, "rank", minimum=1),  # type: ignore[arg-type]
            alpha=get_float(b, "alpha", positive=True),  # type: ignore[arg-type]
            samples=get_int(b, "samples"),  # type: ignore[arg-type]
            modalities=count_map(get_map(b, "modalities"), "modalities"),
            metrics=number_map(get_map(b, "metrics", optional=True), "metrics"),
            tensors=decode_tensors(get_map(b, "tensors")),
        )


@slotted_dataclass()
class GlobalAdapter:
    """The cloud's merged adapter, broadcast retained so a restarted edge gets it at once."""

    version: int
    base_model: str
    strategy: str
    rank: int
    alpha: float
    tensors: dict[str, np.ndarray]
    contributors: list[str] = field(default_factory=list)

    def to_body(self) -> dict[str, Any]:
        return {
            "version": int(self.version),
            "base_model": self.base_model,
            "strategy": self.strategy,
            "rank": int(self.rank),
            "alpha": float(self.alpha),
            "contributors": list(self.contributors),
            "tensors": encode_tensors(self.tensors),
        }

    @classmethod
    def from_body(cls, body: Any) -> GlobalAdapter:
        b = body_map(body, "global")
        contributors = get_list(b, "contributors", optional=True)
        if not all(isinstance(c, str) for c in contributors):
            raise DecodeError("contributors must be strings")
        return cls(
            version=get_int(b, "version"),  # type: ignore[arg-type]
            base_model=get_str(b, "base_model"),  # type: ignore[arg-type]
            strategy=get_str(b, "strategy"),  # type: ignore[arg-type]
            rank=get_int(b, "rank", minimum=1),  # type: ignore[arg-type]
            alpha=get_float(b, "alpha", positive=True),  # type: ignore[arg-type]
            contributors=contributors,
            tensors=decode_tensors(get_map(b, "tensors")),
        )


@slotted_dataclass()
class Rejection:
    """An upload the cloud refused, and why."""

    seq: int
    reason: str

    def to_body(self) -> dict[str, Any]:
        return {"seq": int(self.seq), "reason": self.reason}


@slotted_dataclass()
class SiteFeedback:
    """What one site needs to personalize: its rank-truncated view of the global and its statistics."""

    site: str
    version: int
    rank: int
    tensors: dict[str, np.ndarray]
    stats: dict[str, float] = field(default_factory=dict)
    accepted: list[int] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)

    def to_body(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "version": int(self.version),
            "rank": int(self.rank),
            "stats": {k: float(v) for k, v in self.stats.items()},
            "accepted": [int(s) for s in self.accepted],
            "rejected": [r.to_body() for r in self.rejected],
            "tensors": encode_tensors(self.tensors),
        }

    @classmethod
    def from_body(cls, body: Any) -> SiteFeedback:
        b = body_map(body, "site_feedback")
        accepted = get_list(b, "accepted", optional=True)
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in accepted):
            raise DecodeError("accepted must be a list of sequence numbers")
        rejected = []
        for r in get_list(b, "rejected", optional=True):
            rb = body_map(r, "rejection")
            rejected.append(Rejection(seq=get_int(rb, "seq"), reason=get_str(rb, "reason")))  # type: ignore[arg-type]
        return cls(
            site=get_str(b, "site"),  # type: ignore[arg-type]
            version=get_int(b, "version"),  # type: ignore[arg-type]
            rank=get_int(b, "rank", minimum=0),  # type: ignore[arg-type]
            stats=number_map(get_map(b, "stats", optional=True), "stats"),
            accepted=accepted,
            rejected=rejected,
            tensors=decode_tensors(get_map(b, "tensors", optional=True)),
        )
