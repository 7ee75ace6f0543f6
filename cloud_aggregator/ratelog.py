"""At most N log lines per key per minute; the rest are counted, then summarised in one line.

Why: every refusal used to log a line, so a client flooding garbage could fill the journal at the
rate it publishes.  Counting keeps the information (how many, which reason) at a bounded cost.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class RateLimitedLog:
    """``log(key, msg, *args)`` emits while ``key`` has had fewer than ``per_window`` lines in the window."""

    logger: logging.Logger
    per_window: int = 10
    window_s: float = 60.0
    clock: Callable[[], float] = field(default=lambda: 0.0)
    level: int = logging.INFO
    #: lines not emitted, over the whole life of the process (a metric)
    suppressed_total: int = 0
    _windows: dict[str, tuple[float, int, int]] = field(default_factory=dict, repr=False)

    def log(self, key: str, msg: str, *args: object) -> bool:
        """Log or count one line; True if it was emitted."""
        now = self.clock()
        start, emitted, suppressed = self._windows.get(key, (now, 0, 0))
        if now - start >= self.window_s:
            if suppressed:
                self.logger.log(self.level, "%d more %r lines suppressed in the last %.0f s",  # pragma: no mutate
                                suppressed, key, now - start)
            start, emitted, suppressed = now, 0, 0
        if emitted < self.per_window:
            self._windows[key] = (start, emitted + 1, suppressed)
            self.logger.log(self.level, msg, *args)
            return True
        self._windows[key] = (start, emitted, suppressed + 1)
        self.suppressed_total += 1
        return False
