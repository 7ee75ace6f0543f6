"""How far one edge's upload is from the global: ‖ΔW_edge - ΔW_global‖ / ‖ΔW_global‖.

Compared in effective-update space (``s·B A``), not factor space, because ranks, alphas and
the global's form (padded, stacked, SVD) differ; the Gram identity
⟨B₁A₁, B₂A₂⟩ = Σ (B₁ᵀB₂ ⊙ A₁A₂ᵀ) keeps it an r-by-r computation per module.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from megace_common.lora import lora_a, lora_b

from .contribution import Contribution, GlobalState, parse


def _inner(b1: np.ndarray, a1: np.ndarray, b2: np.ndarray, a2: np.ndarray) -> float:
    return float(((b1.T @ b2) * (a1 @ a2.T)).sum())


def _sq(x: np.ndarray) -> float:
    """``Σ x²`` (``x`` float64)."""
    return float((x * x).sum())


def relative_drift(
    c: Contribution, g: GlobalState, wants: Callable[[str], bool] = lambda name: True
) -> float | None:
    """Relative distance over the tensors both sides have (and ``wants``); None if the global is 0 there."""
    num = den = 0.0
    parsed = parse(c.tensors)
    for m, (a, b) in parsed.pairs.items():
        if not wants(m) or a is None:
            continue
        ga, gb = g.tensors.get(lora_a(m)), g.tensors.get(lora_b(m))
        if ga is None:
            continue
        a64, ga64 = a.astype(np.float64), ga.astype(np.float64)
        if b is not None and gb is not None:
            b64, gb64 = b.astype(np.float64) * c.scaling, gb.astype(np.float64)
            xx, yy, xy = _inner(b64, a64, b64, a64), _inner(gb64, ga64, gb64, ga64), _inner(b64, a64, gb64, ga64)
            num += max(xx + yy - 2.0 * xy, 0.0)
            den += max(yy, 0.0)
        else:  # A-only strategies (fedsa): compare the rows both have
            r = min(a64.shape[0], ga64.shape[0])
            num += _sq(a64[:r] - ga64[:r])
            den += _sq(ga64[:r])
    for name, t in parsed.extras.items():
        gt = g.tensors.get(name)
        if wants(name) and gt is not None and gt.shape == t.shape:
            num += _sq(t.astype(np.float64) - gt.astype(np.float64))
            den += _sq(gt.astype(np.float64))
    if den <= 0.0:
        return None
    return math.sqrt(num / den)
