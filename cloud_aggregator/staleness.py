"""Asynchrony: how much a late update counts, when it is refused, and when to aggregate.

Staleness ``s = current_version - base_version`` counts the global versions published since
the edge pulled the one it trained on.  Discounts follow FedAsync (Xie et al. 2019); the
buffer follows FedBuff (Nguyen et al. 2022): aggregate every K arrivals or every T seconds.
Time is passed in explicitly (``now``) so the policies are deterministic under test.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

from .errors import FutureBase, StaleUpdate


def staleness(current_version: int, base_version: int) -> int:
    """Versions missed; a base newer than the current global is refused, not clamped."""
    if base_version > current_version:
        raise FutureBase(f"base {base_version} > current {current_version}")
    return current_version - base_version


class Discount(ABC):
    """Weight multiplier in (0, 1], non-increasing in staleness, 1 at s = 0."""

    name: ClassVar[str] = ""

    @abstractmethod
    def __call__(self, s: int) -> float: ...


@dataclass(frozen=True)
class Constant(Discount):
    name: ClassVar[str] = "constant"

    def __call__(self, s: int) -> float:
        return 1.0


@dataclass(frozen=True)
class Polynomial(Discount):
    """``(1 + s)^-a``: smooth decay, the FedAsync default with a = 0.5."""

    a: float = 0.5
    name: ClassVar[str] = "polynomial"

    def __post_init__(self) -> None:
        if self.a < 0:
            raise ValueError("a must be >= 0")

    def __call__(self, s: int) -> float:
        return (1.0 + max(s, 0)) ** (-self.a)


@dataclass(frozen=True)
class Hinge(Discount):
    """1 up to ``b`` versions late, then ``1 / (a (s - b) + 1)``: tolerate a little lag for free."""

    a: float = 10.0
    b: int = 4
    name: ClassVar[str] = "hinge"

    def __post_init__(self) -> None:
        if self.a < 0 or self.b < 0:
            raise ValueError("a and b must be >= 0")

    def __call__(self, s: int) -> float:
        if s <= self.b:  # pragma: no mutate (equivalent: at s == b the formula below also gives 1.0)
            return 1.0
        return 1.0 / (self.a * (s - self.b) + 1.0)


DISCOUNTS: dict[str, type[Discount]] = {c.name: c for c in (Constant, Polynomial, Hinge)}


def get_discount(name: str, **config: float) -> Discount:
    try:
        return DISCOUNTS[name](**config)  # type: ignore[arg-type]
    except KeyError:
        raise ValueError(f"unknown discount {name!r}; known: {sorted(DISCOUNTS)}") from None


@dataclass(frozen=True)
class StalenessPolicy:
    """Turns (current, base) into a weight multiplier, or refuses the update as too stale."""

    discount: Discount = field(default_factory=Polynomial)
    max_staleness: int | None = 16

    def weight(self, current_version: int, base_version: int) -> float:
        """Discount for an update; raises ``StaleUpdate`` / ``FutureBase`` (typed reasons)."""
        s = staleness(current_version, base_version)
        if self.max_staleness is not None and s > self.max_staleness:
            raise StaleUpdate(f"staleness {s} > max {self.max_staleness}")
        return self.discount(s)


@dataclass
class BufferPolicy:
    """FedBuff-style trigger: aggregate once ``k`` updates are buffered or ``period_s`` has passed.

    The timer only fires with at least ``min_updates`` buffered, so an idle fleet does not
    mint empty versions.  ``next_deadline`` lets the service sleep exactly until the timer.
    """

    k: int = 10
    period_s: float | None = None
    min_updates: int = 1
    pending: int = 0
    window_start: float = 0.0

    def __post_init__(self) -> None:
        if self.k < 1 or self.min_updates < 1:
            raise ValueError("k and min_updates must be >= 1")
        if self.period_s is not None and self.period_s <= 0:
            raise ValueError("period_s must be > 0")

    def start(self, now: float, pending: int = 0) -> None:
        """Open a window (at start-up, pass the pending count recovered from the ledger)."""
        self.window_start = now
        self.pending = pending

    def arrived(self, n: int = 1) -> None:
        self.pending += n

    def should_aggregate(self, now: float) -> bool:
        if self.pending >= self.k:
            return True
        return (
            self.period_s is not None and self.pending >= self.min_updates and now - self.window_start >= self.period_s
        )

    def next_deadline(self) -> float:
        """Monotonic time at which the timer fires (inf without a period)."""
        return math.inf if self.period_s is None else self.window_start + self.period_s

    def aggregated(self, now: float, consumed: int | None = None) -> None:
        """Close the window after an aggregation that used ``consumed`` (default: all) updates."""
        self.pending = 0 if consumed is None else max(self.pending - consumed, 0)
        self.window_start = now
