"""Coordinate-wise median of ΔW (Yin et al. 2018): breaks down only when half the edges are malicious.

The trimmed mean that keeps the middle value (odd K) or the mean of the middle two (even K); see
``coordinatewise.py`` for the ΔW-space machinery and the re-factorisation.
"""

from __future__ import annotations

from .coordinatewise import CoordinateWise


class Median(CoordinateWise):
    name = "median"

    def trim(self, k: int) -> int:
        return (k - 1) // 2
