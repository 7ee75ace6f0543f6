"""Exact SVD of a low-rank product ``B @ A`` without always forming it.

When the inner rank ``R`` is below ``min(out, in)`` the QR route (``B = Q_b R_b``,
``Aᵀ = Q_a R_a``, SVD of the ``RxR`` core) is both cheaper and exact; otherwise the dense
product is small enough to decompose directly.
"""

from __future__ import annotations

import torch


def svd_of_product(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U, S, Vh`` of ``b @ a`` truncated to its maximal possible rank ``min(R, out, in)``."""
    out_dim, r = b.shape
    in_dim = a.shape[1]
    if r < min(out_dim, in_dim):
        qb, rb = torch.linalg.qr(b)
        qa, ra = torch.linalg.qr(a.T)
        u, s, vh = torch.linalg.svd(rb @ ra.T)
        return qb @ u, s, vh @ qa.T
    # here R >= min(out, in), so the reduced SVD already has the maximal rank min(out, in)
    u, s, vh = torch.linalg.svd(b @ a, full_matrices=False)
    return u, s, vh


def balanced_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B) = (√S Vᵀ, U √S)``: ordered by singular value, so slicing the first r is the best rank-r fit."""
    root = s.clamp_min(0).sqrt()
    return root[:, None] * vh, u * root[None, :]
