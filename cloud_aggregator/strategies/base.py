"""The one interface every aggregation rule implements, and the vectorised plumbing they share.

A strategy sees, per module, the factors of every eligible edge stacked into one array
(``A``: ``(K, r_max, in)``, ``B``: ``(K, out, r_max)``, zero-padded where ranks differ, ``B``
with the edge's ``alpha/r`` alongside in ``scales``) plus one unnormalised weight per edge.  Doing
the maths on stacks rather than per edge is what keeps 1,000 edges well under a second.  numpy only
(the cloud service never imports torch): stacks are at least float32, weights and scales float64.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from megace_common.lora import lora_a, lora_b, lora_scaling, rescale_b
from megace_common.views import ViewCut, cut_view, keeps_modality

from ..contribution import Contribution, GlobalState, parse


@dataclass
class ModuleStack:
    """Every eligible edge's factors of one module, stacked and scale-folded."""

    module: str
    a: np.ndarray | None  # (K, r_max, in)
    b: np.ndarray | None  # (K, out, r_max), raw: the edge's alpha_k/r_k is in ``scales``
    ranks: np.ndarray  # (K,) int64
    weights: np.ndarray  # (K,) unnormalised, ≥ 0
    scales: np.ndarray  # (K,) alpha_k / r_k, float64
    max_share: float = 1.0  # no edge's normalised weight above this (see cap_shares)

    @property
    def normalized(self) -> np.ndarray:
        return self.normalize(self.weights)

    def normalize(self, w: np.ndarray) -> np.ndarray:
        """Weights summing to one with no share above ``max_share`` (rules weighting by their own statistic)."""
        return cap_shares(normalize(w), self.max_share)

    def b_coefficients(self, w: np.ndarray) -> np.ndarray:
        """Per-edge multipliers for raw ``B_k`` so that ``Σ c_k B_k`` = ``Σ w_k s_k B_k``.

        Folding the scaling into the weights avoids materialising a scaled copy of the B stack.
        """
        return w * self.scales


def normalize(w: np.ndarray) -> np.ndarray:
    """Weights summing to one; uniform when they are all zero (e.g. fresh LoRA with B = 0)."""
    total = w.sum()
    if not np.isfinite(total) or total <= 0:
        return np.full_like(w, 1.0 / max(len(w), 1))
    return w / total


def cap_shares(w: np.ndarray, max_share: float) -> np.ndarray:
    """Normalised weights with none above ``max_share``, the excess handed to the others pro rata.

    Why: a weight is whatever the edge claims (samples), so one edge claiming 10^12 samples would
    otherwise *be* the global.  Water-filling: cap the largest, re-spread the rest, repeat; weights
    that are all zero share the remainder equally.  When ``K x max_share <= 1`` no weighting can
    satisfy the cap and the result is uniform.
    """
    k = len(w)
    if max_share >= 1.0 or k == 0 or not bool((w > max_share).any()):
        return w
    if k * max_share <= 1.0:
        return np.full_like(w, 1.0 / k)
    capped = np.zeros(k, dtype=bool)
    out = w.copy()
    while True:
        free = ~capped
        rest = 1.0 - max_share * int(capped.sum())
        base = w[free]
        spread = base / base.sum() if float(base.sum()) > 0 else np.full_like(base, 1.0 / len(base))
        out[free] = spread * rest
        out[capped] = max_share
        over = free & (out > max_share)
        if not bool(over.any()):
            return out
        capped |= over


def stack_padded(ts: Sequence[np.ndarray], dim: int, size: int, dtype: np.dtype) -> np.ndarray:
    """Stack arrays, zero-padding dimension ``dim`` (the rank axis) up to ``size``.

    Zero-padding a LoRA pair is exact: the extra rank-one terms are 0 ⊗ 0.
    """
    if all(t.shape[dim] == size for t in ts):
        return np.stack(list(ts)).astype(dtype, copy=False)
    shape = list(ts[0].shape)
    shape[dim] = size
    out = np.zeros((len(ts), *shape), dtype=dtype)
    for i, t in enumerate(ts):
        idx = [i] + [slice(None)] * t.ndim
        idx[dim + 1] = slice(0, t.shape[dim])
        out[tuple(idx)] = t
    return out


def weighted_sum(w: np.ndarray, stack: np.ndarray) -> np.ndarray:
    """Σ_k w_k · stack_k as one BLAS call, in the stack's dtype."""
    return np.tensordot(w.astype(stack.dtype), stack, axes=1)


def work_dtype(t: np.ndarray) -> np.dtype:
    """At least float32: half-precision sums over 1,000 edges lose too much."""
    return np.promote_types(t.dtype, np.float32)


class Strategy(ABC):
    """One aggregation rule.

    ``aggregate`` turns the current global and a batch of contributions into the next global;
    ``view_for`` cuts the global down to what one edge (rank, alpha, modalities) receives.
    ``weights`` passed to ``aggregate`` are extra per-contribution multipliers (staleness
    discount, trust); each rule multiplies them by its own statistic (samples, samples of a
    modality, adapter norm).
    """

    name: ClassVar[str] = ""
    #: cap on any one contribution's share of a module's aggregate; the core sets it from the config
    max_share: float = 1.0
    #: the factors of successive globals live in the same coordinates, so a server optimizer
    #: (momentum, Adam) on ``new - old`` is meaningful; false for SVD/stacked forms.
    factor_space: ClassVar[bool] = True
    #: which LoRA factors leave the edge and come back down
    shares_a: ClassVar[bool] = True
    shares_b: ClassVar[bool] = True

    # ---- hooks -------------------------------------------------------------------------
    def base_weight(self, c: Contribution, name: str) -> float | None:
        """Weight of ``c`` for tensor/module ``name`` before extras; None excludes it."""
        return float(c.samples)

    @abstractmethod
    def aggregate_module(self, stack: ModuleStack) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Global ``(A, B)`` at scaling 1 for one module."""

    def view_modalities(self, modalities: dict[str, int] | None) -> frozenset[str] | None:
        """The modalities whose tensors an edge with these sample counts receives (default: None, every one)."""
        return None

    def wants(self, name: str, modalities: dict[str, int] | None) -> bool:
        """Whether an edge with ``modalities`` receives tensor/module ``name``."""
        return keeps_modality(name, self.view_modalities(modalities))

    def own_views(self, g: GlobalState) -> set[str]:
        """Modules whose view this rule computes itself (:meth:`view_module`) rather than cutting the global.

        None by default: a view is then :func:`megace_common.views.cut_view` of the global as published, which
        an edge performs itself when its feedback names the cut instead of carrying the tensors.
        """
        return set()

    def view_module(self, g: GlobalState, module: str, rank: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """An edge's rank-``rank`` factors at scaling 1 for a module :meth:`own_views` lists."""
        raise NotImplementedError(f"{self.name} cuts every module's view from the global")

    def cap_share(self, max_share: float) -> None:
        """Set ``max_share`` here and on a wrapped rule (``inner``), so whichever one builds a stack caps it."""
        if not 0 < max_share <= 1:
            raise ValueError("max_share must be in (0, 1]")
        self.max_share = max_share
        inner = getattr(self, "inner", None)
        if isinstance(inner, Strategy):
            inner.cap_share(max_share)

    def combine_extra(self, stack: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """A non-LoRA tensor's aggregate from the ``(K, ...)`` stack (default: the capped weighted mean)."""
        return weighted_sum(cap_shares(normalize(weights), self.max_share), stack)

    # ---- driver ------------------------------------------------------------------------
    def aggregate(
        self,
        global_state: GlobalState | None,
        contributions: Sequence[Contribution],
        weights: Sequence[float] | None = None,
    ) -> GlobalState:
        """Next global adapter; modules and tensors nobody eligible sent are kept from ``global_state``."""
        extra = [1.0] * len(contributions) if weights is None else [float(w) for w in weights]
        if len(extra) != len(contributions):
            raise ValueError("one weight per contribution")
        if any(w < 0 or w != w for w in extra):
            raise ValueError("weights must be non-negative numbers")
        parsed = [parse(c.tensors) for c in contributions]
        out: dict[str, np.ndarray] = {}
        if global_state is not None:
            out.update(global_state.tensors)

        modules: dict[str, list[int]] = {}
        for i, p in enumerate(parsed):
            for m in p.pairs:
                modules.setdefault(m, []).append(i)
        for m, idxs in modules.items():
            stack = self._stack(m, idxs, contributions, parsed, extra)
            if stack is None:
                continue
            a, b = self.aggregate_module(stack)
            out.pop(lora_a(m), None)
            out.pop(lora_b(m), None)
            if a is not None and self.shares_a:
                out[lora_a(m)] = a
            if b is not None and self.shares_b:
                out[lora_b(m)] = b

        extras: dict[str, list[int]] = {}
        for i, p in enumerate(parsed):
            for n in p.extras:
                extras.setdefault(n, []).append(i)
        for n, idxs in extras.items():
            ws, ts = [], []
            for i in idxs:
                bw = self.base_weight(contributions[i], n)
                if bw is not None:
                    ws.append(bw * extra[i])
                    ts.append(parsed[i].extras[n])
            if ts:
                dt = work_dtype(ts[0])
                out[n] = self.combine_extra(np.stack(ts).astype(dt, copy=False), np.array(ws, dtype=np.float64))

        version = 1 if global_state is None else global_state.version + 1
        return GlobalState(version=version, tensors=out, strategy=self.name)

    def _stack(
        self,
        module: str,
        idxs: list[int],
        contributions: Sequence[Contribution],
        parsed: list,
        extra: list[float],
    ) -> ModuleStack | None:
        a_list, b_list, ranks, ws, scales = [], [], [], [], []
        for i in idxs:
            a, b = parsed[i].pairs[module]
            if (self.shares_a and a is None) or (self.shares_b and b is None):
                continue
            bw = self.base_weight(contributions[i], module)
            if bw is None:
                continue
            a_list.append(a)
            b_list.append(b)
            ranks.append(int(a.shape[0]) if a is not None else int(b.shape[1]))
            ws.append(bw * extra[i])
            scales.append(contributions[i].scaling)
        if not ranks:
            return None
        r_max = max(ranks)
        ref = a_list[0] if a_list[0] is not None else b_list[0]
        dt = work_dtype(ref)
        a_st = stack_padded(a_list, 0, r_max, dt) if self.shares_a else None
        b_st = stack_padded(b_list, 1, r_max, dt) if self.shares_b else None
        return ModuleStack(
            module=module,
            a=a_st,
            b=b_st,
            ranks=np.array(ranks, dtype=np.int64),
            weights=np.array(ws, dtype=np.float64),
            scales=np.array(scales, dtype=np.float64),
            max_share=self.max_share,
        )

    def view_cut(self, rank: int, modalities: dict[str, int] | None = None, alpha: float | None = None) -> ViewCut:
        """How the global is cut for an edge of LoRA rank ``rank``, ``alpha`` (default: alpha = rank) and modalities."""
        own = lora_scaling(alpha, rank) if alpha is not None else 1.0
        return ViewCut(rank, own, self.view_modalities(modalities), self.shares_a, self.shares_b)

    def cut_for(
        self, g: GlobalState, rank: int, modalities: dict[str, int] | None = None, alpha: float | None = None
    ) -> ViewCut | None:
        """The cut that gives this edge's whole view of ``g``, or None where it receives a module viewed otherwise."""
        cut = self.view_cut(rank, modalities, alpha)
        return None if any(cut.keeps(m) for m in self.own_views(g)) else cut

    def view_for(
        self,
        global_state: GlobalState,
        rank: int,
        modalities: dict[str, int] | None = None,
        alpha: float | None = None,
    ) -> dict[str, np.ndarray]:
        """What an edge of LoRA rank ``rank`` and ``alpha`` (default: alpha = rank) loads.

        ``B`` is divided by the edge's ``alpha/rank`` so its own scaling reproduces the global ΔW.
        """
        cut = self.view_cut(rank, modalities, alpha)
        out = cut_view(global_state.arrays(), cut)
        for m in sorted(self.own_views(global_state)):
            out.pop(lora_a(m), None)
            out.pop(lora_b(m), None)
            if not cut.keeps(m):
                continue
            a, b = self.view_module(global_state, m, rank)
            if a is not None and self.shares_a:
                out[lora_a(m)] = np.ascontiguousarray(a)
            if b is not None and self.shares_b:
                out[lora_b(m)] = np.ascontiguousarray(rescale_b(b, 1.0, cut.scaling))  # the global is at scaling 1
        return out
