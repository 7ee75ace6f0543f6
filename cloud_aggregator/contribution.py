"""The data the aggregator works on: one edge's contribution and the global adapter.

Scaling convention (why: edges may train with different rank ``r`` and ``alpha``, and LoRA
applies ``alpha / r``, so raw factors from different edges are not comparable):

* an edge's *effective* update of a module is ``ΔW_k = s_k · B_k @ A_k`` with ``s_k = alpha_k / r_k``;
* the cloud folds ``s_k`` into ``B`` on the way in (``B ← s_k · B``, ``A`` untouched), so the
  global adapter is stored at scaling 1: ``ΔW_global = B_g @ A_g`` exactly;
* on the way down the view divides ``B`` by the receiving edge's own ``alpha / r``, so that the
  edge's ``(alpha/r) · B_view @ A_view`` is the intended effective update.

Folding into ``B`` (rather than ``√s`` into both) keeps ``A`` scale-free, which is what FedSA
shares, and makes fedavg of equally-scaled edges identical to averaging the raw factors.

Tensors are numpy arrays throughout the cloud (the service never imports torch); maths that is
float32 stays float32 and norms are taken in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from megace_common.lora import lora_a, lora_b, lora_scaling, split_lora


def to_numpy(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """C-contiguous arrays of ``tensors`` (no copy where they already are): what the wire encodes without a copy."""
    return {n: np.ascontiguousarray(t) for n, t in tensors.items()}


@dataclass
class Contribution:
    """One accepted (or to-be-validated) update from an edge."""

    edge_id: str
    seq: int
    base_version: int
    rank: int
    alpha: float
    samples: int
    tensors: dict[str, np.ndarray]
    modalities: dict[str, int] = field(default_factory=dict)
    fingerprint: str = ""

    @property
    def scaling(self) -> float:
        """LoRA scaling ``alpha / r``.  rsLoRA edges (``alpha/√r``) must declare ``alpha·√r`` instead."""
        return lora_scaling(self.alpha, self.rank) if self.rank else 1.0


@dataclass
class GlobalState:
    """The global adapter at one version, stored at scaling 1 (see module docstring).

    ``tensors`` uses canonical peft names.  The rank of a module is whatever its factors'
    shapes say: the max edge rank for fedavg/hetlora, the sum of ranks for flora's stacked
    form, the numerical rank for flexlora's SVD form.
    """

    version: int
    tensors: dict[str, np.ndarray]
    strategy: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    # per-version cache (e.g. flora's SVDs); never persisted
    cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def modules(self) -> list[str]:
        return sorted({p[0] for n in self.tensors if (p := split_lora(n)) is not None})

    def rank_of(self, module: str) -> int:
        a = self.tensors.get(lora_a(module))
        if a is not None:
            return int(a.shape[0])
        return int(self.tensors[lora_b(module)].shape[1])

    def arrays(self) -> dict[str, np.ndarray]:
        """The tensors as numpy arrays sharing their memory: what the global message carries, views are cut from."""
        return to_numpy(self.tensors)

    def delta(self, module: str) -> np.ndarray:
        """Dense effective ΔW of one module (for tests and diagnostics)."""
        return self.tensors[lora_b(module)] @ self.tensors[lora_a(module)]


@dataclass
class Factors:
    """A contribution split into LoRA pairs and other tensors."""

    pairs: dict[str, tuple[np.ndarray | None, np.ndarray | None]]
    extras: dict[str, np.ndarray]


def parse(tensors: dict[str, np.ndarray]) -> Factors:
    """Group ``<module>.lora_A/B.weight`` into pairs; everything else is an extra."""
    pairs: dict[str, list[np.ndarray | None]] = {}
    extras: dict[str, np.ndarray] = {}
    for name, t in tensors.items():
        p = split_lora(name)
        if p is None:
            extras[name] = t
            continue
        slot = pairs.setdefault(p[0], [None, None])
        slot[0 if p[1] == "A" else 1] = t
    return Factors({m: (ab[0], ab[1]) for m, ab in pairs.items()}, extras)


def effective_norm(c: Contribution) -> float:
    """Frobenius norm of the whole effective update: sqrt(Σ_m ‖s·B_m A_m‖² + Σ ‖extra‖²).

    Uses ‖BA‖² = Σ (BᵀB ⊙ AAᵀ), an rxr computation, so it stays cheap for wide layers.
    """
    total = 0.0
    parsed = parse(c.tensors)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is an inf norm, which the validator refuses
        for a, b in parsed.pairs.values():
            if a is None or b is None:
                continue
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            total += float(((b64.T @ b64) * (a64 @ a64.T)).sum()) * c.scaling**2
        for t in parsed.extras.values():
            t64 = t.astype(np.float64)
            total += float((t64 * t64).sum())
    return math.sqrt(max(total, 0.0))
