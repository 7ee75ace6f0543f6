"""Exact SVD of a low-rank product ``B @ A`` without always forming it.

When the inner rank ``R`` is below ``min(out, in)`` the QR route (``B = Q_b R_b``,
``Aᵀ = Q_a R_a``, SVD of the ``RxR`` core) is both cheaper and exact; otherwise the dense
product is small enough to decompose directly.
"""

from __future__ import annotations

import numpy as np


def svd_of_product(b: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``U, S, Vh`` of ``b @ a`` truncated to its maximal possible rank ``min(R, out, in)`` (LAPACK, input dtype)."""
    out_dim, r = b.shape
    in_dim = a.shape[1]
    if r < min(out_dim, in_dim):
        qb, rb = np.linalg.qr(b)
        qa, ra = np.linalg.qr(a.T)
        u, s, vh = np.linalg.svd(rb @ ra.T)  # square R x R core: full and reduced SVD coincide
        return qb @ u, s, vh @ qa.T
    # here R >= min(out, in), so the reduced SVD already has the maximal rank min(out, in)
    u, s, vh = np.linalg.svd(b @ a, full_matrices=False)
    return u, s, vh


def balanced_factors(u: np.ndarray, s: np.ndarray, vh: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(A, B) = (√S Vᵀ, U √S)``: ordered by singular value, so slicing the first r is the best rank-r fit."""
    root = np.sqrt(np.maximum(s, 0))
    return root[:, None] * vh, u * root[None, :]
