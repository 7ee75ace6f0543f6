"""Bound how far one upload moves the global: clip each module's *step*, not only its size.

Why: the norm guard judges ``‖ΔW_k‖``, the size of the edge's whole adapter.  An edge that sends the
global back with its B flipped (``-3 B``) has an ordinary-sized adapter, passes that guard, and pulls
the global backwards by ``4 ‖ΔW_G‖`` in one round; ``15 x`` an honest update inside the band does
the same forwards.  What a round of honest local training changes is the *step* from what the edge
was sent, and that is what this module bounds (norm bounding, Sun et al. 2019: with every step
clipped, one edge can move the global at most as far as an honest one does).

Per module ``m``, the step of an upload against ``v``, the current global's view at the upload's own
rank, alpha and modalities (exactly what a fresh edge of that shape loads) is
``‖s (B A - B_v A_v)‖_F`` (an rxr Gram computation, like the norm guard's), and ``‖t - t_v‖`` for a
non-LoRA tensor or an A-only (fedsa) module.  A step above the bound is shrunk by moving the upload
toward the view, ``x' = v + λ (x - v)`` on every factor, with the largest ``λ`` (halving) whose step
fits.  The bound is ``multiplier`` x the median of the module's recently accepted (clipped) steps;
before ``min_history`` exist, the steps of all such modules together are held to ``cold_ratio`` x
``‖W0‖`` of the frozen base, so a new cloud's very first upload is bounded too.  Clipping only
shrinks: it never refuses, and an honest edge whose step is typical is left exactly as sent.

What it cannot do: a rule that weights by claimed sample counts (fedavg, modality-aware over fedavg)
still hands one edge up to ``max_share`` of a module, and an edge that steps as far as allowed in the
wrong direction every round outweighs honest edges whose steps partly cancel.  Measured in the closed
loop (``bench/bench_poisoned_loop.py``); robust rules (``median``, ``trimmed-mean``) ignore the claims.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import numpy as np

from megace_common.lora import lora_a, lora_b

from .contribution import Contribution, parse

#: halvings of ``λ`` tried before the step is dropped entirely (λ = 0: the upload equals the view)
_MAX_HALVINGS = 40


def _pair_step(a: np.ndarray, b: np.ndarray, va: np.ndarray, vb: np.ndarray, s: float) -> float:
    """``‖s (B A - B_v A_v)‖_F`` through the 2r x 2r Gram identity, never forming an out x in matrix."""
    f64 = np.float64
    bc = np.concatenate([b.astype(f64), -vb.astype(f64)], axis=1)
    ac = np.concatenate([a.astype(f64), va.astype(f64)], axis=0)
    return abs(s) * float(np.sqrt(max(float(((bc.T @ bc) * (ac @ ac.T)).sum()), 0.0)))


def _fit(t: np.ndarray | None, like: np.ndarray) -> np.ndarray:
    """The view's tensor shaped like the upload's (zeros where the view has no such tensor)."""
    if t is None or t.shape != like.shape:
        return np.zeros_like(like)
    return t.astype(like.dtype, copy=False)


def _norm64(x: np.ndarray) -> float:
    """Frobenius norm of ``x`` (float64)."""
    return float(np.linalg.norm(x))


@dataclass
class StepBound:
    """Per-module clipping of upload steps; owned by ``Admission`` and re-armed from the ledger."""

    multiplier: float = 3.0
    cold_bound: float | None = None
    min_history: int = 3
    window: int = 64
    history: dict[str, deque[float]] = field(default_factory=dict)

    def limits(self, steps: dict[str, float]) -> dict[str, float]:
        """Each module's limit for this upload.  Modules without history share the cold bound: their steps
        together (as one vector) may be at most ``cold_bound`` long, so the bound holds for the whole upload."""
        out: dict[str, float] = {}
        cold: list[str] = []
        for key in steps:
            hist = self.history.get(key)
            if hist is not None and len(hist) >= self.min_history:
                out[key] = self.multiplier * statistics.median(hist)
            elif self.cold_bound is not None:
                cold.append(key)
        total = sum(steps[k] ** 2 for k in cold) ** 0.5
        if self.cold_bound is not None and total > self.cold_bound:
            out.update({k: steps[k] * self.cold_bound / total for k in cold})
        return out

    def steps(self, c: Contribution, view: dict[str, np.ndarray]) -> dict[str, float]:
        """Each module's (or non-LoRA tensor's) step from ``view``."""
        out: dict[str, float] = {}
        p = parse(c.tensors)
        for m, (a, b) in p.pairs.items():
            if a is None:
                continue
            va = _fit(view.get(lora_a(m)), a)
            if b is None:
                out[m] = _norm64(a.astype(np.float64) - va.astype(np.float64))
            else:
                out[m] = _pair_step(a, b, va, _fit(view.get(lora_b(m)), b), c.scaling)
        for n, t in p.extras.items():
            out[n] = _norm64(t.astype(np.float64) - _fit(view.get(n), t).astype(np.float64))
        return out

    def clip(self, c: Contribution, view: dict[str, np.ndarray]) -> tuple[Contribution, dict[str, float], int]:
        """``c`` with every over-long step shrunk; returns it, the steps it now takes, and how many were cut."""
        steps = self.steps(c, view)
        tensors = dict(c.tensors)
        cut = 0
        limits = self.limits(steps)
        for key, step in steps.items():
            limit = limits.get(key)
            if limit is None or step <= limit:
                continue
            names = [n for n in (lora_a(key), lora_b(key), key) if n in tensors]
            # the longest of λ0, λ0/2, λ0/4, ... that fits; λ = 0 (the view itself) always does
            for lam in [limit / step / 2**k for k in range(_MAX_HALVINGS)] + [0.0]:
                trial = {n: _toward(tensors[n], view.get(n), lam) for n in names}
                got = self.steps(replace(c, tensors=trial), view)[key]
                if got <= limit * (1 + 1e-9):
                    break
            tensors.update(trial)
            steps[key] = got
            cut += 1
        return (replace(c, tensors=tensors) if cut else c), steps, cut

    def observe(self, steps: dict[str, float]) -> None:
        """Record an accepted upload's (clipped) steps."""
        for key, step in steps.items():
            hist = self.history.setdefault(key, deque(maxlen=self.window))
            hist.append(step)

    def rearm(self, recent: Iterable[dict[str, float]]) -> None:
        """Replay accepted steps, oldest first, after a restart (so a restart cannot disarm the bound)."""
        for steps in recent:
            self.observe(steps)


def _toward(t: np.ndarray, v: np.ndarray | None, lam: float) -> np.ndarray:
    """``v + λ (t - v)`` in ``t``'s dtype (``v`` absent: zeros)."""
    base = _fit(v, t).astype(np.float64)
    return (base + lam * (t.astype(np.float64) - base)).astype(t.dtype)
