"""FlexLoRA (Bai et al. 2024): average the full ΔW_k, then SVD and give each edge its top-r part.

The global is stored as the balanced SVD factors ``A = √S Vᵀ``, ``B = U √S`` of the averaged
ΔW (rank ``min(Σ r_k, out, in)``, so still exact); since components are sorted by singular
value, an edge's rank-r view is a slice, and its Frobenius error is √(Σ_{i>r} s_i²).
"""

from __future__ import annotations

import numpy as np

from .base import ModuleStack, Strategy
from .lowrank import balanced_factors, svd_of_product


class FlexLoRA(Strategy):
    name = "flexlora"
    factor_space = False

    def aggregate_module(self, stack: ModuleStack) -> tuple[np.ndarray | None, np.ndarray | None]:
        assert stack.a is not None and stack.b is not None  # pragma: no mutate (type narrowing only)
        w = stack.b_coefficients(stack.normalized).astype(stack.b.dtype)
        k, out_dim, r_max = stack.b.shape
        # Σ_k w_k B_k A_k as one matmul over the concatenated rank axis
        b = (stack.b * w[:, None, None]).transpose(1, 0, 2).reshape(out_dim, k * r_max)
        a = stack.a.reshape(k * r_max, -1)
        a_g, b_g = balanced_factors(*svd_of_product(b, a))
        return np.ascontiguousarray(a_g), np.ascontiguousarray(b_g)
