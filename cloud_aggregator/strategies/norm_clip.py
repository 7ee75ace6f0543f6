"""Norm clipping (a wrapper): shrink each edge's ΔW of a module to at most a bound, then aggregate with any rule.

The bound is ``max_norm`` when configured, else ``multiplier`` x the median of the batch's ‖s_k B_k A_k‖_F
for that module (robust to a minority of inflated updates, scale-free, no tuning).  Clipping multiplies the
edge's B (its ``alpha/r`` in the stack), so the direction of ΔW is kept and only its length is cut; for
A-only rules (fedsa) the A's are clipped instead.  Non-LoRA tensors are passed through unclipped.
Like ``modality-aware`` it wraps by composition: ``{strategy = "norm-clip", strategy_options = {inner =
"modality-aware"}}``.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..contribution import Contribution, GlobalState
from .base import ModuleStack, Strategy
from .hetlora import product_norms


class NormClip(Strategy):
    name = "norm-clip"

    def __init__(
        self, inner: Strategy | str = "fedavg", max_norm: float = 0.0, multiplier: float = 1.0, **inner_config: object
    ) -> None:
        if isinstance(inner, str):
            from . import get_strategy

            inner = get_strategy(inner, **inner_config)
        if max_norm < 0 or multiplier <= 0:
            raise ValueError("norm-clip needs max_norm >= 0 (0 = median) and multiplier > 0")
        self.inner = inner
        self.max_norm = float(max_norm)
        self.multiplier = float(multiplier)
        self.factor_space = inner.factor_space  # type: ignore[misc]
        self.shares_a = inner.shares_a  # type: ignore[misc]
        self.shares_b = inner.shares_b  # type: ignore[misc]

    def clip_factors(self, norms: np.ndarray) -> np.ndarray:
        """Per edge: ``min(1, bound / norm)`` (1 for a zero norm)."""
        bound = self.max_norm if self.max_norm > 0 else self.multiplier * float(np.quantile(norms, 0.5))
        return np.where(norms > bound, bound / np.maximum(norms, 1e-300), np.ones_like(norms))

    def aggregate_module(self, stack: ModuleStack) -> tuple[np.ndarray | None, np.ndarray | None]:
        if stack.a is not None and stack.b is not None:
            norms = product_norms(stack.a, stack.b).astype(np.float64) * np.abs(stack.scales)
            stack = replace(stack, scales=stack.scales * self.clip_factors(norms))
        elif stack.a is not None:
            f = self.clip_factors(np.linalg.norm(stack.a.reshape(len(stack.a), -1), axis=1).astype(np.float64))
            stack = replace(stack, a=stack.a * f.astype(stack.a.dtype)[:, None, None])
        return self.inner.aggregate_module(stack)

    def base_weight(self, c: Contribution, name: str) -> float | None:
        return self.inner.base_weight(c, name)

    def combine_extra(self, stack: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return self.inner.combine_extra(stack, weights)

    def view_modalities(self, modalities: dict[str, int] | None) -> frozenset[str] | None:
        return self.inner.view_modalities(modalities)

    def own_views(self, g: GlobalState) -> set[str]:
        return self.inner.own_views(g)

    def view_module(self, g: GlobalState, module: str, rank: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        return self.inner.view_module(g, module, rank)
