"""Counters every service keeps and publishes as JSON metrics."""

from __future__ import annotations

from collections import Counter
from typing import Any


class Counters:
    """Named monotonically increasing counters plus gauges; cheap enough for hot paths."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._gauges: dict[str, float] = {}

    def inc(self, name: str, n: int = 1) -> None:
        self._counts[name] += n

    def reject(self, error: BaseException) -> None:
        """Count a rejected input under ``rejected.<ErrorClass>`` and the total."""
        self._counts["rejected"] += 1
        self._counts[f"rejected.{type(error).__name__}"] += 1

    def set(self, name: str, value: float) -> None:
        self._gauges[name] = value

    def __getitem__(self, name: str) -> float:
        return self._gauges[name] if name in self._gauges else self._counts[name]

    def snapshot(self) -> dict[str, Any]:
        return {**self._counts, **self._gauges}
