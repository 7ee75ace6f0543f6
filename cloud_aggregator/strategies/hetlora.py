"""HetLoRA (Cho et al. 2024): zero-pad to the largest rank, weight by samples x ‖ΔW_k‖_F.

Norm weighting lets edges whose update carries more energy (typically the higher-rank,
better-resourced ones) dominate; views truncate the padded global back to each edge's rank.
"""

from __future__ import annotations

import torch

from .base import ModuleStack, Strategy, weighted_sum


def product_norms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """‖B_k A_k‖_F for every k via the rxr Gram identity ‖BA‖² = Σ (BᵀB ⊙ AAᵀ)."""
    gb = torch.bmm(b.transpose(1, 2), b)
    ga = torch.bmm(a, a.transpose(1, 2))
    return (gb * ga).sum(dim=(1, 2)).clamp_min(0).sqrt()


class HetLoRA(Strategy):
    name = "hetlora"

    def aggregate_module(self, stack: ModuleStack) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        assert stack.a is not None and stack.b is not None  # pragma: no mutate (type narrowing only)
        norms = product_norms(stack.a, stack.b).to(torch.float64) * stack.scales  # pragma: no mutate (to f64: exact)
        w = stack.normalize(stack.weights * norms)
        return weighted_sum(w, stack.a), weighted_sum(stack.b_coefficients(w), stack.b)
