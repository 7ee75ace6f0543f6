"""The last answers to inference requests, kept so that a repeated request is answered with the same bytes.

Why: a device re-sends a request the broker may have lost, with the same seq (``device_sdk.requests``). The
broker did lose it, or only the answer was late, or the answer was lost. The edge cannot tell which, so:

* a request it is still working on (queued, not answered yet) is not queued again: its answer is on the way
  (for :data:`PENDING_TTL_S`; after that it is taken as lost and answered afresh);
* a request it answered gets the *same* signed answer (``Outgoing``) again: same sender, same envelope seq, so a
  device that did get the first one drops this one as a redelivery, and one that did not gets it now;
* a request it never saw (a gap in the device's infer stream, :class:`broker.dedup.GapGuard`), or whose answer it
  no longer keeps (evicted, or the edge restarted), is answered afresh; the device takes one answer per request.

Bounded: the newest :data:`ANSWERS_MAX` requests (all devices together) are kept, oldest forgotten first. A
device that restarts its sequence store forgets its entries (a new request may reuse an old seq).
The edge and its inference workers each hold one (in :class:`~edge_agent.core.EdgeCore`).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import replace

from broker.metrics import Counters
from edge_agent.outgoing import Outgoing

ANSWERS_MAX = 16_384
"""Requests remembered (pending or answered); a prediction is a few hundred bytes, so a few MB at most."""
PENDING_TTL_S = 30.0
"""A request pending this long is taken as lost on the edge's side (an answer that was never recorded): a repeat
is answered afresh rather than waiting for ever."""


class AnswerBook:
    """``(device, request seq)`` → the answer sent (while it is being computed: when it was accepted), newest last.

    Counters: ``duplicates`` and ``infer_repeats_answered`` (the kept answer sent again) or ``infer_repeats_pending``
    (a repeat while the answer is on its way: nothing sent).
    """

    def __init__(self, counters: Counters, capacity: int = ANSWERS_MAX) -> None:
        self.counters = counters
        self.capacity = max(int(capacity), 1)
        self.pending_ttl_s = PENDING_TTL_S
        self._entries: OrderedDict[tuple[str, int], tuple[Outgoing, ...] | float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def repeated(self, device: str, seq: int, out: list[Outgoing]) -> bool:
        """True for a repeat of a request known here: its kept answer is added to ``out`` (nothing while it is
        pending). False: answer it (new, a gap filled, or its answer is no longer kept)."""
        key = (device, seq)
        entry = self._entries.get(key)
        if entry is None or (isinstance(entry, float) and time.monotonic() - entry > self.pending_ttl_s):
            return False
        self.counters.inc("duplicates")
        if isinstance(entry, float):
            self.counters.inc("infer_repeats_pending")
            return True
        self._entries.move_to_end(key)
        self.counters.inc("infer_repeats_answered")
        out.extend(entry)
        return True

    def accepted(self, device: str, seq: int, *, new: bool) -> None:
        """Request ``seq`` was accepted and is being answered; ``new``: the device's infer guard had not seen it
        (else it was answered once and its answer is no longer kept: ``infer_repeats_fresh``)."""
        if not new:
            self.counters.inc("infer_repeats_fresh")
        self._put((device, seq), time.monotonic())

    def record(self, device: str, seq: int, out: list[Outgoing]) -> list[Outgoing]:
        """``out`` is the answer to request ``seq`` (returned as is). An empty one (an error downlink suppressed by
        the rate limit) is not kept: a repeat is then answered afresh."""
        key = (device, seq)
        if out:
            self._put(key, tuple(replace(o, done=None) for o in out))  # ``done`` belongs to the first request's ack
        else:
            self._entries.pop(key, None)
        return out

    def forget(self, device: str) -> None:
        """``device`` numbers from a new sequence store: its old seqs may come again as new requests."""
        for key in [k for k in self._entries if k[0] == device]:
            del self._entries[key]

    def _put(self, key: tuple[str, int], value: tuple[Outgoing, ...] | float) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
