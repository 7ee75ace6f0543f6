"""HetLoRA (Cho et al. 2024): zero-pad to the largest rank, weight by samples x ‖ΔW_k‖_F.

Norm weighting lets edges whose update carries more energy (typically the higher-rank,
better-resourced ones) dominate; views truncate the padded global back to each edge's rank.
"""

from __future__ import annotations

import numpy as np

from .base import ModuleStack, Strategy, weighted_sum


def product_norms(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """‖B_k A_k‖_F for every k via the rxr Gram identity ‖BA‖² = Σ (BᵀB ⊙ AAᵀ), in the stacks' dtype."""
    gb = np.matmul(b.transpose(0, 2, 1), b)
    ga = np.matmul(a, a.transpose(0, 2, 1))
    return np.sqrt(np.maximum((gb * ga).sum(axis=(1, 2)), 0))


class HetLoRA(Strategy):
    name = "hetlora"

    def aggregate_module(self, stack: ModuleStack) -> tuple[np.ndarray | None, np.ndarray | None]:
        assert stack.a is not None and stack.b is not None  # pragma: no mutate (type narrowing only)
        norms = product_norms(stack.a, stack.b).astype(np.float64) * stack.scales  # pragma: no mutate (to f64: exact)
        w = stack.normalize(stack.weights * norms)
        return weighted_sum(w, stack.a), weighted_sum(stack.b_coefficients(w), stack.b)
