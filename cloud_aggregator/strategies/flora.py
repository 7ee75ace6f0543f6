"""FLoRA (Wang et al. 2024): stack factors so the global ΔW is exactly Σ_k w_k s_k B_k A_k.

``A_g = [A_1; …; A_K]`` (rank axis), ``B_g = [w_1 s_1 B_1, …, w_K s_K B_K]``; no cross terms,
so no aggregation noise.  An edge gets its rank through the truncated SVD of the stacked
product (computed once per global version, then sliced).

The stacked rank Σ r_k can exceed ``min(out, in)``; storing it then only wastes space, so by
default (``lossless_compaction=True``) such a module is re-factored into its exact SVD form of
rank ``min(out, in)``.  Either way ``B_g @ A_g`` is the exact weighted sum.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from megace_common.lora import lora_a, lora_b
from megace_common.views import fit_rank

from ..contribution import Contribution, GlobalState
from .base import ModuleStack, Strategy
from .lowrank import balanced_factors, svd_of_product


class FLoRA(Strategy):
    name = "flora"
    factor_space = False

    def __init__(self, lossless_compaction: bool = True) -> None:
        self.lossless_compaction = lossless_compaction
        self._sorted: set[str] = set()  # modules compacted during the current aggregate() call

    def aggregate(
        self,
        global_state: GlobalState | None,
        contributions: Sequence[Contribution],
        weights: Sequence[float] | None = None,
    ) -> GlobalState:
        """As the base, plus ``meta["svd_sorted"]``: compacted modules whose views are plain slices."""
        self._sorted = set()
        g = super().aggregate(global_state, contributions, weights)
        kept = set(global_state.meta.get("svd_sorted", ())) if global_state is not None else set()
        touched = {m for c in contributions for m in g.modules() if lora_a(m) in c.tensors}
        g.meta["svd_sorted"] = sorted((kept - touched) | self._sorted)
        return g

    def aggregate_module(self, stack: ModuleStack) -> tuple[np.ndarray | None, np.ndarray | None]:
        assert stack.a is not None and stack.b is not None  # pragma: no mutate (type narrowing only)
        w = stack.b_coefficients(stack.normalized).astype(stack.b.dtype)
        keep = stack.ranks.tolist()
        k, _, r_max = stack.b.shape
        # drop the zero padding so the stacked rank is exactly Σ r_k
        if all(r == r_max for r in keep):  # pragma: no mutate (a fast path: the general one below gives the same)
            a = stack.a.reshape(k * r_max, -1)
            b = (stack.b * w[:, None, None]).transpose(1, 0, 2).reshape(stack.b.shape[1], k * r_max)
        else:
            a = np.concatenate([stack.a[i, :r] for i, r in enumerate(keep)])
            b = np.concatenate([stack.b[i, :, :r] * w[i] for i, r in enumerate(keep)], axis=1)
        if self.lossless_compaction and a.shape[0] > min(a.shape[1], b.shape[0]):
            a, b = balanced_factors(*svd_of_product(b, a))
            self._sorted.add(stack.module)
        return np.ascontiguousarray(a), np.ascontiguousarray(b)

    def own_views(self, g: GlobalState) -> set[str]:
        """Stacked modules: an edge's rank-r view is the best rank-r fit of ``B_g A_g`` (an SVD), not a slice."""
        compacted = set(g.meta.get("svd_sorted", ()))
        return {m for m in g.modules() if m not in compacted}

    def view_module(self, g: GlobalState, module: str, rank: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        cache = g.cache.setdefault("flora_svd", {})  # pragma: no mutate (any private key works)
        if module not in cache:
            cache[module] = balanced_factors(*svd_of_product(g.tensors[lora_b(module)], g.tensors[lora_a(module)]))
        a, b = cache[module]
        return fit_rank(a, "A", rank), fit_rank(b, "B", rank)
