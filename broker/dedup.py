"""Receiver-side de-duplication: QoS 1 is at-least-once, megace's delivery is exactly-once.

Senders number their envelopes with a per-sender monotonically increasing ``seq``
(persisted across restarts). A resend after a reconnect repeats old numbers in
order, so "drop anything at or below the last seq seen" turns at-least-once into
exactly-once for every in-order stream.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict


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


GAPS_MAX = 1024
"""Gaps remembered per sender by :class:`GapGuard`; beyond, the oldest is abandoned (counted)."""
FOREIGN_MAX = 64
"""Seqs above the high-water mark known to belong to another stream of the sender (per sender)."""


class GapGuard(SequenceGuard):
    """A high-water mark that also remembers the seqs it skipped, so a late resend of a lost seq is accepted once.

    Why: a broker may acknowledge a QoS 1 publish and then lose it (NATS JetStream failover, Mosquitto's full
    offline queue). With end-to-end receipts the device re-sends what the edge did not get, below the mark;
    a plain high-water mark would drop it as a duplicate. ``holes[sender]`` holds the skipped seqs (at most
    ``max_gaps``, oldest abandoned and counted in :attr:`abandoned`); a seq inside it is a fill, accepted once.

    A device numbers all its envelopes (features, inference requests, registrations) from one counter, so the
    features stream skips the seqs of the others: :meth:`foreign` tells the guard about those, so they are not
    reported as missing.
    """

    def __init__(self, last: dict[str, int] | None = None, holes: dict[str, list[int]] | None = None,
                 *, max_gaps: int = GAPS_MAX) -> None:
        super().__init__(last)
        self.max_gaps = max_gaps
        self.holes: dict[str, set[int]] = {k: set(v) for k, v in (holes or {}).items() if v}
        self.floors: dict[str, int] = {}
        """Per sender, the lowest seq it may still re-send (its registration's ``resend_from``): no gap below."""
        self.fills = 0
        self.abandoned = 0
        self.closed = 0
        self._foreign: dict[str, set[int]] = {}

    def seen(self, sender: str, seq: int) -> bool:
        prev = self.last.get(sender)
        if prev is None or seq > prev:
            return False
        gaps = self.holes.get(sender)
        return gaps is None or seq not in gaps

    def accept(self, sender: str, seq: int) -> bool:
        prev = self.last.get(sender)
        if prev is not None and seq <= prev:
            gaps = self.holes.get(sender)
            if gaps is None or seq not in gaps:
                self.duplicates += 1
                return False
            gaps.discard(seq)
            if not gaps:
                del self.holes[sender]
            self.fills += 1
            return True
        if prev is not None and seq > prev + 1:
            self.gaps_opened(sender, prev, seq)
        self.last[sender] = seq
        return True

    def gaps_opened(self, sender: str, prev: int, seq: int) -> None:
        """Remember ``prev+1 .. seq-1`` (less the sender's foreign seqs), newest ``max_gaps`` kept."""
        self.gaps += 1
        foreign = self._foreign.get(sender, set())
        floor = max(prev + 1, self.floors.get(sender, 0))
        low = max(floor, seq - self.max_gaps)
        skipped = max(seq - floor, 0) - len([f for f in foreign if floor <= f < seq])
        new = {s for s in range(low, seq) if s not in foreign}
        if foreign:
            self._foreign[sender] = {f for f in foreign if f > seq}
        gaps = self.holes.setdefault(sender, set())
        gaps |= new
        lost = max(skipped - len(new), 0)
        if len(gaps) > self.max_gaps:
            for old in sorted(gaps)[: len(gaps) - self.max_gaps]:
                gaps.discard(old)
                lost += 1
        self.abandoned += lost
        if not gaps:
            del self.holes[sender]

    def foreign(self, sender: str, seq: int) -> None:
        """``seq`` of ``sender`` belongs to another stream (an inference request, a registration): never a gap."""
        gaps = self.holes.get(sender)
        if gaps is not None and seq in gaps:
            gaps.discard(seq)
            if not gaps:
                del self.holes[sender]
            return
        prev = self.last.get(sender)
        if prev is None or seq > prev:
            marks = self._foreign.setdefault(sender, set())
            marks.add(seq)
            if len(marks) > FOREIGN_MAX:
                marks.discard(min(marks))

    def floor(self, sender: str, low: int) -> None:
        """``sender`` will never (re-)send a seq below ``low``: forget its gaps there (counted :attr:`closed`), open
        none there later. Why: a device that restarts skips the rest of its reserved seq block; without this,
        that unused range would be reported missing for ever (and hold every receipt's ``upto`` below it)."""
        if low <= self.floors.get(sender, -1):
            return
        self.floors[sender] = low
        holes = self.holes.get(sender)
        if holes:
            below = {s for s in holes if s < low}
            if below:
                holes -= below
                self.closed += len(below)
                if not holes:
                    del self.holes[sender]

    def forget(self, sender: str) -> None:
        """The sender's seqs start over (a new sequence store): drop its mark, its gaps and its floor."""
        self.last.pop(sender, None)
        self.holes.pop(sender, None)
        self.floors.pop(sender, None)
        self._foreign.pop(sender, None)

    def missing(self, sender: str, limit: int) -> tuple[int | None, list[int]]:
        """``(upto, missing)`` for a receipt: every seq up to ``upto`` was accepted except ``missing`` (sorted,
        at most ``limit``); with more gaps than ``limit``, ``upto`` stops below the first gap not listed."""
        last = self.last.get(sender)
        if last is None:
            return None, []
        gaps = sorted(self.holes.get(sender, ()))
        if len(gaps) <= limit:
            return last, gaps
        # ``upto`` must be a seq that arrived (every listed gap lies below it): the seq just under the first gap
        # not listed, stepping back while that seq is itself a listed gap (a run of consecutive losses)
        k = limit
        while k > 0 and gaps[k - 1] == gaps[k] - 1:
            k -= 1
        upto = gaps[k] - 1
        return (upto, gaps[:k]) if upto >= 0 else (None, [])

    def holes_dict(self) -> dict[str, list[int]]:
        """The gaps as plain lists (a checkpoint holds them beside ``last``)."""
        return {k: sorted(v) for k, v in self.holes.items() if v}


class RecentEnvelopes:
    """The last ``capacity`` messages seen, by (sender, seq, digest of the bytes): a repeat among them is a duplicate.

    For a receiver of several topics from one sender (a device's downlinks: predictions, configs, receipts):
    MQTT orders QoS 1 messages per topic only, so a high-water mark across topics could drop a new message
    that overtook an older one; a redelivery (a publisher's resend after its connection dropped before the
    PUBACK, as a broker failing over does) repeats a recent message byte for byte. The digest keeps a sender
    whose seqs started over (an edge re-installed with an empty state directory) from being taken for a repeat.
    """

    def __init__(self, capacity: int = 4096) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.duplicates = 0
        self._seen: OrderedDict[tuple[str, int, bytes], None] = OrderedDict()

    def accept(self, sender: str, seq: int, payload: bytes) -> bool:
        """True if this message is new (and remember it, forgetting the oldest beyond capacity)."""
        key = (sender, seq, hashlib.blake2b(payload, digest_size=16).digest())
        if key in self._seen:
            self.duplicates += 1
            return False
        self._seen[key] = None
        if len(self._seen) > self.capacity:
            self._seen.popitem(last=False)
        return True
