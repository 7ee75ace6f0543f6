"""Coordinate-wise trimmed mean of ΔW (Yin et al. 2018): drop the ``ceil(beta K)`` extremes at each end.

At least one value is dropped at each end from K = 3 on (so one attacker among 3-4 edges is always cut),
never more than leaves the middle one or two (the median).  See ``coordinatewise.py`` for the ΔW-space
machinery and the re-factorisation.
"""

from __future__ import annotations

import math

from .coordinatewise import CoordinateWise


class TrimmedMean(CoordinateWise):
    name = "trimmed-mean"

    def __init__(self, beta: float = 0.2) -> None:
        if not 0 <= beta < 0.5:
            raise ValueError("trimmed-mean needs 0 <= beta < 0.5")
        self.beta = float(beta)

    def trim(self, k: int) -> int:
        return min(math.ceil(self.beta * k), (k - 1) // 2)
