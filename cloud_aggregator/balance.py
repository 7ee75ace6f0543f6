"""Fix the LoRA factor gauge of an upload before any strategy averages its factors.

``B A = (B D⁻¹)(D A)`` for any invertible ``D``: the effective update (what the norm guard judges)
does not see how it is split between the factors, but a rule that averages A and B *separately*
(fedavg, hetlora, fedsa) does.  An edge that sends ``10⁴·A`` and ``10⁻⁴·B`` passes every ΔW check,
then the average of the A's is its A and the average of the B's is the honest B's, and the
global's ΔW is ~10⁴/K times too large.

Chosen defence (documented alternative: aggregate in ΔW space, which flora/flexlora and the robust
rules already do): canonicalise every upload on intake, *exactly* (ΔW unchanged), with a gauge that
is the identity for honest uploads:

1. **A's scale**: ``‖A‖_F/√r`` is kept within ``[rho/τ, rho·τ]`` of the module's initial row scale ``rho``
   (``Reference.a_rms``), the factor moved into B.  Honest training rescales A little (the closed loop,
   3 edges x 6 rounds: 0.52x-2.4x), so ``τ = 4`` leaves honest uploads as sent.  (Single rows of A do
   shrink a lot, down to 0.07x, which is why the band is on the whole factor and not per row.)
2. **B**: a B far larger than ``ΔW`` needs (one row of A shrunk to nothing and its B column blown up,
   or nearly collinear rows of A) is shrunk to ``‖s·B‖_F ≤ τ·‖ΔW‖_F / rho``; not exact: it can only make
   the update smaller.  Honest uploads reach 1.23 of the ``τ = 1`` limit (same run).
3. **A-only uploads** (FedSA): there is no B to compensate in, so A is scaled into the band.

After 1-2 every accepted update has ``‖A‖_F ≤ τrho√r`` and ``‖sB‖_F ≤ τ‖ΔW‖/rho``, so every cross term
``s_k B_k A_l`` of a factor average is at most ``τ²√r`` times the largest accepted ‖ΔW_k‖: bounded by
the norm guard.  The ledger stores the canonicalised tensors, so a restart aggregates the same ones.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from megace_common.lora import lora_a, lora_b

from .contribution import Contribution, parse


def balance(c: Contribution, a_rms: dict[str, float], band: float) -> tuple[Contribution, int]:
    """``c`` with every module's factors brought into the gauge band; returns it and how many modules changed.

    Modules without a reference scale, and a band of 0 (off), are left as sent.  Unchanged tensors are
    the very same objects, so an honest upload is stored bit for bit.
    """
    if band <= 0:
        return c, 0
    tensors = dict(c.tensors)
    changed = 0
    for m, (a, b) in parse(c.tensors).pairs.items():
        rho = a_rms.get(m)
        if a is None or rho is None or rho <= 0 or a.ndim != 2:
            continue
        f64 = np.float64
        new = _balance_pair(a.astype(f64), None if b is None else b.astype(f64), rho, band, c.scaling)
        if new is None:
            continue
        na, nb = new
        tensors[lora_a(m)] = na.astype(a.dtype)
        if b is not None and nb is not None:
            tensors[lora_b(m)] = nb.astype(b.dtype)
        changed += 1
    if not changed:
        return c, 0
    return replace(c, tensors=tensors), changed


def _balance_pair(
    a: np.ndarray, b: np.ndarray | None, rho: float, band: float, scaling: float
) -> tuple[np.ndarray, np.ndarray | None] | None:
    """The balanced ``(A, B)`` in float64, or None when the pair is already in the band."""
    r = a.shape[0]
    scale = float(np.linalg.norm(a)) / math.sqrt(r) if r else 0.0
    d = 1.0
    if scale > 0:
        d = min(max(scale, rho / band), rho * band) / scale
    na = a * d if d != 1.0 else a
    if b is None:
        return (na, None) if d != 1.0 else None
    nb = b / d if d != 1.0 else b
    # step 2: ||s B|| at most band x ||ΔW|| / rho (ΔW computed through the r x r Gram matrices)
    delta = math.sqrt(max(float(((nb.T @ nb) * (na @ na.T)).sum()), 0.0)) * abs(scaling)
    limit = band * delta / rho
    norm_b = float(np.linalg.norm(nb)) * abs(scaling)
    shrink = norm_b > limit * (1 + 1e-9)
    if shrink:
        nb = nb * (limit / norm_b)
    return (na, nb) if d != 1.0 or shrink else None
