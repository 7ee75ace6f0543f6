"""Per-key token buckets: answer a flood at a bounded rate, count the rest.

Why: a device (or anything spoofing one) that sends garbage as fast as it can would otherwise get one
error downlink per message, so the edge's outbound traffic follows the attacker's.  Keys are bounded
too (least recently used forgotten first): the keys come from the input.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class TokenBuckets:
    """``allow(key)`` is true at most ``rate`` times a second per key, after a burst of ``burst``."""

    def __init__(self, rate: float, burst: int, *, max_keys: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate < 0 or burst < 1 or max_keys < 1:
            raise ValueError("rate >= 0, burst >= 1 and max_keys >= 1")
        self.rate, self.burst, self.max_keys, self.clock = float(rate), int(burst), int(max_keys), clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)
        self.denied = 0

    def allow(self, key: str) -> bool:
        if self.rate == 0:
            self.denied += 1
            return False
        now = self.clock()
        tokens, at = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        ok = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if ok else tokens, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        if not ok:
            self.denied += 1
        return ok
