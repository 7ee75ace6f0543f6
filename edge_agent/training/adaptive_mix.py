"""Adaptive local aggregation: a round starts from the mix of the fleet's model and the site's own that does
best on the site's held-out samples (FedALA-style, one weight for the whole model).

Why: starting every round from the fleet's model (FedAvg-FT) throws away what a site learned that the fleet
did not; keeping the site's model ignores the fleet. Which is better differs by site and by round, and the
held-out samples the trainer keeps anyway can tell (reports/experiment-fleet.md: everything shared with this
start beats training alone and FedAvg-FT on personalized accuracy in every setting). The grid is small on
purpose: each candidate costs one forward pass over the held-out window, and a finer choice would fit the
window's noise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

#: the fleet's weights tried; 1.0 is FedAvg-FT's start, 0.0 the site's own model
MIX_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)


def mix(fleet: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], w: float) -> dict[str, torch.Tensor]:
    """``w · fleet + (1 - w) · own`` per tensor (the same names in both)."""
    return {k: w * fleet[k] + (1.0 - w) * v for k, v in own.items()}


def best_mix(grid: tuple[float, ...], install: Callable[[float], None], score: Callable[[], float]) -> float:
    """Install each weight of ``grid``, score it, and leave the best installed (a tie keeps the larger weight:
    the fleet's model carries the classes the site has not seen)."""
    scores: dict[float, float] = {}
    for w in sorted(grid, reverse=True):
        install(w)
        scores[w] = score()
    best = max(scores, key=lambda w: (scores[w], w))
    install(best)
    return best


__all__ = ["MIX_GRID", "best_mix", "mix"]
