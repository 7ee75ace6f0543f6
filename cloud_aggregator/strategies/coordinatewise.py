"""Coordinate-wise robust statistics of the edges' dense ΔW, re-factorised to the rank the wire carries.

Shared by ``trimmed-mean`` and ``median`` (the median is the trimmed mean that keeps only the middle one
or two values).  Per module, ``ΔW_k = s_k B_k A_k`` is formed in column blocks (so 1,000 edges of a
384x384 layer never need 600 MB at once), sorted along the edge axis, trimmed and averaged.  The result
is not low-rank in general, so it is truncated to the largest rank in the batch by SVD and stored as
FlexLoRA stores its global: balanced factors ``(√S Vᵀ, U √S)`` sorted by singular value, so an edge's
rank-r view is a slice (``Strategy.view_module``) and the best rank-r fit.

Unweighted on purpose: sample counts and staleness are what an attacker claims, and a robust statistic
that an edge can weight its way around is not robust.  Rules in ΔW space are also immune to factor
rescaling (``A x c``, ``B / c``), and their globals are not in factor coordinates (``factor_space`` off:
no server optimizer, no FedBuff step).  Non-LoRA tensors get the same coordinate-wise statistic.
"""

from __future__ import annotations

from abc import abstractmethod

import numpy as np

from .base import ModuleStack, Strategy
from .lowrank import balanced_factors

#: elements of one (K, out, cols) block of dense updates
BLOCK_ELEMENTS = 1 << 23


def trimmed_mean(x: np.ndarray, trim: int) -> np.ndarray:
    """Mean over axis 0 after dropping the ``trim`` smallest and largest values of every coordinate."""
    if trim <= 0:
        return x.mean(axis=0)
    s = np.sort(x, axis=0)
    return s[trim : x.shape[0] - trim].mean(axis=0)


def dense_statistic(stack: ModuleStack, trim: int) -> np.ndarray:
    """The coordinate-wise trimmed mean of ``s_k B_k A_k`` over the stack, block by block of columns."""
    assert stack.a is not None and stack.b is not None  # pragma: no mutate (type narrowing only)
    k, out_dim, _ = stack.b.shape
    in_dim = stack.a.shape[2]
    b = stack.b * stack.scales.astype(stack.b.dtype)[:, None, None]
    dense = np.empty((out_dim, in_dim), dtype=stack.b.dtype)
    cols = max(1, BLOCK_ELEMENTS // max(k * out_dim, 1))
    for j in range(0, in_dim, cols):
        dense[:, j : j + cols] = trimmed_mean(np.matmul(b, stack.a[:, :, j : j + cols]), trim)
    return dense


class CoordinateWise(Strategy):
    """Base of the coordinate-wise rules; a subclass says how many values to trim at each end."""

    factor_space = False

    @abstractmethod
    def trim(self, k: int) -> int:
        """Values dropped at each end of every coordinate, for ``k`` edges."""

    def aggregate_module(self, stack: ModuleStack) -> tuple[np.ndarray | None, np.ndarray | None]:
        assert stack.a is not None and stack.b is not None  # pragma: no mutate (type narrowing only)
        dense = dense_statistic(stack, self.trim(stack.b.shape[0]))
        rank = min(int(stack.ranks.max()), *dense.shape)
        u, s, vh = np.linalg.svd(dense, full_matrices=False)
        a, b = balanced_factors(u[:, :rank], s[:rank], vh[:rank])
        return np.ascontiguousarray(a), np.ascontiguousarray(b)

    def combine_extra(self, stack: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return trimmed_mean(stack, self.trim(stack.shape[0]))
