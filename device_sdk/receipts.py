"""Hold every record until the edge receipts it: delivery that survives a broker losing acknowledged messages.

Why: a broker's PUBACK only says the broker took the message. NATS lost PUBACKed records in a JetStream
failover, Mosquitto drops them when an offline subscriber's queue is full, bridges lose them on restart. An
edge that announces ``receipts`` in its config downlink sends ``receipt`` downlinks once its ingest log
holds a device's records (:class:`broker.wire.receipt.Receipt`); this module keeps each PUBACKed
``features``/``features_batch`` message in memory until a receipt covers it and re-publishes it, same seq
(the edge accepts a seq it reported missing once), when:

* a receipt lists it in ``missing`` (at least :data:`MISSING_GRACE_S` after its PUBACK, so a re-send in
  flight is not sent again on the next receipt);
* a receipt covers a message acknowledged after it (overtaken: the broker lost it);
* the edge's receipts made no progress for ``receipt_timeout_s``: the oldest held message goes again as a probe
  (backing off while nothing moves; a lagging edge that still advances is left alone: no re-send storm);
* the connection drops (held messages go back to the head of the on-disk queue, like un-acked ones).

With an edge that does not announce receipts (older edges) nothing is held: a record is done at its PUBACK.
Not thread-safe: everything here runs under the client's lock (paho's thread only queues events).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from broker.metrics import Counters
from broker.wire import DeviceConfig
from broker.wire.receipt import Receipt

if TYPE_CHECKING:
    from device_sdk.store import DiskQueue

MISSING_GRACE_S = 1.0
"""A record a receipt lists as missing is re-sent only this long after its (last) PUBACK."""
MAX_BACKOFF_DOUBLINGS = 5
"""While the edge makes no progress, probes back off up to ``receipt_timeout_s * 2**5``."""
CHECK_EVERY_S = 0.1

Frames = list[tuple[str, bytes]]


class _Held:
    __slots__ = ("acked_at", "frames", "missing", "order")

    def __init__(self) -> None:
        self.frames: Frames = []
        self.acked_at = 0.0
        self.order = 0
        self.missing = False


class ReceiptBook:
    """PUBACKed record messages of one device not yet covered by a receipt.

    Re-sends, each of a held message, at least :data:`MISSING_GRACE_S` after its last PUBACK:

    * *missing*: a receipt lists it;
    * *overtaken*: a receipt covers a message acknowledged after it (a broker delivers one publisher's messages
      in order, so an earlier one not covered by then was lost);
    * *probe*: when no receipt advanced ``upto`` for ``timeout_s``, the oldest held message alone goes again,
      then again after twice as long, ... (an edge that is away gets one message per probe, not everything
      held; once it covers the probe, everything acknowledged before it is overtaken and goes at once).

    Args:
        features_topic: The device's features topic; messages on it (or its chunk topics) are held.
        max_unreceipted: Messages held plus in flight before a publish waits (back-pressure).
        timeout_s: ``receipt_timeout_s``.
        counters: The client's: ``receipted`` (messages a receipt covered), ``resent`` (re-published with their
            seq), ``rejected.ReceiptMismatchError`` (a receipt for another device; nothing released).
    """

    def __init__(self, features_topic: str, max_unreceipted: int, timeout_s: float, counters: Counters) -> None:
        self.features_topic = features_topic
        self._chunks = features_topic + "/chunk/"
        self.max_unreceipted = max_unreceipted
        self.timeout_s = timeout_s
        self.counters = counters
        self.enabled = False
        self.held: dict[int, _Held] = {}
        self.upto = -1
        self.last_progress = time.monotonic()
        self._probes = 0  # since the last progress
        self._order = 0
        self._next_check = 0.0

    def set_enabled(self, enabled: bool) -> None:
        """The edge's config says whether it sends receipts; an edge that stopped: nothing is held any more."""
        if enabled and not self.enabled:
            self._progress(time.monotonic())
        self.enabled = enabled
        if not enabled:
            self.held.clear()

    def _progress(self, now: float) -> None:
        self.last_progress = now
        self._probes = 0

    def hold(self, pending: tuple[int, str, bytes, int | None]) -> None:
        """The broker acknowledged ``(seq, topic, payload, row)``: keep it if it is a record message."""
        seq, topic, payload, _ = pending
        if topic != self.features_topic and not topic.startswith(self._chunks):
            return
        entry = self.held.get(seq)
        if entry is None:
            entry = self.held[seq] = _Held()
        entry.frames.append((topic, payload))
        entry.acked_at = time.monotonic()
        self._order += 1
        entry.order = self._order

    def full(self, inflight: int) -> bool:
        return self.enabled and len(self.held) + inflight >= self.max_unreceipted

    def apply(self, receipt: Receipt) -> list[tuple[int, Frames]]:
        """Release what ``receipt`` covers; returns what is due again now (missing or overtaken)."""
        now = time.monotonic()
        held = self.held
        if receipt.upto > self.upto:
            self.upto = receipt.upto
            self._progress(now)
        missing = set(receipt.missing)
        done = [s for s in held if s <= receipt.upto and s not in missing]
        newest = 0
        for seq in done:
            newest = max(newest, held.pop(seq).order)
        if done:
            self.counters.inc("receipted", len(done))
        for seq, entry in held.items():
            if seq in missing or entry.order < newest:
                entry.missing = True
        self._next_check = 0.0
        return self.due(now)

    def due(self, now: float | None = None) -> list[tuple[int, Frames]]:
        """Held messages to re-send now (see the class docstring)."""
        now = time.monotonic() if now is None else now
        if now < self._next_check or not self.held:
            return []
        self._next_check = now + CHECK_EVERY_S
        out = [seq for seq, e in self.held.items() if e.missing and now - e.acked_at >= MISSING_GRACE_S]
        wait = self.timeout_s * 2 ** min(self._probes, MAX_BACKOFF_DOUBLINGS)
        if not out and now - self.last_progress >= wait:
            oldest = min(self.held.items(), key=lambda item: item[1].order)
            if now - oldest[1].acked_at >= self.timeout_s:
                out.append(oldest[0])
                self._probes += 1
                self.last_progress = now  # the next probe waits twice as long, unless the edge moves first
        return self.take(sorted(out))

    def take(self, seqs: list[int]) -> list[tuple[int, Frames]]:
        """Remove ``seqs`` for a re-send (counted ``resent``); they are held again at their next PUBACK."""
        out = [(seq, self.held.pop(seq).frames) for seq in seqs]
        if out:
            self.counters.inc("resent", len(out))
        return out

    def take_all(self) -> list[tuple[int, str, bytes]]:
        """Everything held, as on-disk queue rows in seq order (a lost connection: re-sent after the next)."""
        return [(seq, t, p) for seq, frames in self.take(sorted(self.held)) for t, p in frames]


class DeliveryReceipts:
    """The :class:`~device_sdk.client.DeviceClient` side: receipt events, re-sends, back-pressure, waiting.

    A mixin like :class:`~device_sdk.events.LinkEvents` (state is the client's, declared here for reading)."""

    _book: ReceiptBook
    _lock: threading.Condition
    _wake: threading.Event
    _events: deque[tuple[str, Any]]
    _inflight: dict[int, tuple[int, str, bytes, int | None]]
    _online: bool
    _closing: bool
    store: DiskQueue
    counters: Counters
    device: str

    if TYPE_CHECKING:  # the client's and device_sdk.events.LinkEvents'
        def _publish_now(self, topic: str, payload: bytes, *, seq: int, row_id: int | None = None) -> None: ...
        def _wait_for_acks(self, timeout: float) -> None: ...
        def _process_events(self) -> None: ...

    def _on_delivery(self, message: Any) -> None:
        """A receipt or a config from the edge (paho's thread): queue it like any event."""
        self._events.append(("receipt", message))
        self._wake.set()

    def _delivery_event(self, message: Any) -> None:
        """Apply a queued receipt or config (caller holds the lock)."""
        if isinstance(message, DeviceConfig):
            self._book.set_enabled(message.receipts)
        elif self._book.enabled:
            self._resend(self._book.apply(message))

    def _resend_from(self, seq: int) -> int:
        """The lowest seq of a record this device may still (re-)send: its registration tells the edge, which then
        opens no gap below it (a restarted device skips the rest of its reserved seq block). Caller holds the lock."""
        low = [seq, *self._book.held, *(p[0] for p in self._inflight.values())]
        stored = self.store.min_seq()
        return min(low if stored is None else [*low, stored])

    def _resend_due(self) -> None:
        self._resend(self._book.due())

    def _resend(self, items: list[tuple[int, Frames]]) -> None:
        for seq, frames in items:
            for topic, payload in frames:
                if self._online and len(self.store) == 0:
                    self._publish_now(topic, payload, seq=seq)
                elif not self.store.append(seq, topic, payload):
                    self.counters.inc("dropped_newest")

    def _held_to_store(self) -> None:
        """Held messages go to the head of the on-disk queue (a lost connection, or close)."""
        self.store.prepend(self._book.take_all())

    def _hold_back(self) -> None:
        """Back-pressure (caller holds the lock): wait while ``max_unreceipted`` messages await a receipt."""
        book = self._book
        if not (self._online and book.full(len(self._inflight))):
            return
        low = book.max_unreceipted * 3 // 4
        while self._online and book.enabled and not self._closing and len(book.held) + len(self._inflight) > low:
            self._wait_for_acks(0.005)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every record so far is acknowledged by the broker; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._batcher.flush()  # type: ignore[attr-defined]
            while True:
                self._process_events()
                if not self._inflight and len(self.store) == 0:
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._wait_for_acks(min(left, 0.01))

    @property
    def pending(self) -> int:
        """Records not yet acknowledged by the broker (in flight or on disk)."""
        with self._lock:
            self._process_events()
            return len(self._inflight) + len(self.store)

    @property
    def unreceipted(self) -> int:
        """Record messages the broker acknowledged and the edge has not receipted yet."""
        with self._lock:
            self._process_events()
            return len(self._book.held)

    def wait_delivered(self, timeout: float = 30.0) -> bool:
        """Wait until every record so far is receipted by the edge (or, with an edge that sends no receipts,
        acknowledged by the broker); False on timeout. Unlike :meth:`flush`, True means the edge has them."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._batcher.flush()  # type: ignore[attr-defined]
            while True:
                self._process_events()
                if not self._inflight and len(self.store) == 0 and not self._book.held:
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._wait_for_acks(min(left, 0.01))
