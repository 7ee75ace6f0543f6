"""Receiver-side de-duplication: QoS 1 is at-least-once, megace's delivery is exactly-once.

Senders number their envelopes with a per-sender monotonically increasing ``seq``
(persisted across restarts). A resend after a reconnect repeats old numbers in
order, so "drop anything at or below the last seq seen" turns at-least-once into
exactly-once for every in-order stream.
"""

from __future__ import annotations


class SequenceGuard:
    """Last accepted sequence number per sender."""

    def __init__(self, last: dict[str, int] | None = None) -> None:
        self.last: dict[str, int] = dict(last or {})
        self.duplicates = 0
        self.gaps = 0

    def seen(self, sender: str, seq: int) -> bool:
        """True if ``seq`` would be dropped as a duplicate; records nothing, so a receiver can look before it
        validates and :meth:`accept` only what it keeps (a rejected message must not advance the guard)."""
        prev = self.last.get(sender)
        return prev is not None and seq <= prev

    def accept(self, sender: str, seq: int) -> bool:
        """True if ``seq`` is new for ``sender`` (and record it); False for a duplicate/replay."""
        prev = self.last.get(sender)
        if prev is not None and seq <= prev:
            self.duplicates += 1
            return False
        if prev is not None and seq > prev + 1:
            self.gaps += 1
        self.last[sender] = seq
        return True
