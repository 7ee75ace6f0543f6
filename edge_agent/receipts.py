"""Delivery receipts: after each ingest-log commit, tell each device which of its records the edge holds.

Why: a broker acknowledges a QoS 1 publish (PUBACK) to the device and may lose it afterwards (NATS JetStream
failover, Mosquitto's full offline queue, a bridge restart). The only proof that a record reached the edge is
the edge saying so once the record is durable: a ``receipt`` downlink (:class:`broker.wire.receipt.Receipt`):
every features seq of the device up to ``upto`` is logged except ``missing``. The device keeps its records
until a receipt covers them and re-sends the missing ones with their seq; the edge's gap-aware guard
(:class:`broker.dedup.GapGuard`) accepts such a fill once.

Timing: the service calls :meth:`ReceiptTracker.touched` for every record message it handles (new, filled or
repeated: a repeat means the device missed a receipt). :class:`edge_agent.acks.DurableAcks` calls
:meth:`seal` just before a commit (the guard's state then covers exactly what that commit makes durable) and
:meth:`durable` after it; only then is a receipt built, coalesced to one per device per ``interval_s``. With a
receiver process the records reach the agent already logged, so a touch is durable at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from broker.dedup import GapGuard
from broker.errors import WireError
from broker.metrics import Counters
from broker.wire import Kind
from broker.wire.receipt import MAX_MISSING, Receipt
from edge_agent.core import EdgeCore, Outgoing

log = logging.getLogger(__name__)

Snapshot = tuple[int, tuple[int, ...]]
"""``(upto, missing)`` of one device, taken at a seal."""


class ReceiptTracker:
    """Which devices are owed a receipt, and what it says; emits them through ``emit`` (the downlink queue).

    Args:
        core: Whose registry's features guard is reported and who signs the downlink (``core.down``).
        emit: Queues downlinks (:meth:`edge_agent.downlinks.DownlinkQueue.emit`).
        counters: ``receipts_sent``, ``receipt_fills`` (re-sent records accepted into a gap),
            ``receipt_gaps_abandoned`` (gaps forgotten beyond the guard's bound: a re-send of one is then
            dropped as a duplicate, and the receipt covers it) and ``receipt_gaps_closed`` (gaps below a
            registration's ``resend_from``: seqs the device will not send, e.g. the rest of a seq block).
        interval_s: At most one receipt per device this often.
        enabled: False (``receipts = false``): track nothing, send nothing.
        durable_on_touch: The records reach the core already logged (a receiver process).
    """

    def __init__(self, core: EdgeCore, emit: Callable[[list[Outgoing]], None], counters: Counters, *,
                 interval_s: float = 0.2, enabled: bool = True, durable_on_touch: bool = False) -> None:
        self.core = core
        self.emit = emit
        self.counters = counters
        self.interval_s = interval_s
        self.enabled = enabled
        self.durable_on_touch = durable_on_touch
        self._pending: set[str] = set()
        self._touch_scheduled = False
        self._sealed: dict[str, Snapshot] = {}
        self._ready: dict[str, Snapshot] = {}
        self._last_sent: dict[str, float] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._seen = (0, 0, 0)  # the guard's fills, abandoned and closed gaps already counted

    @classmethod
    def attach(cls, agent: object) -> ReceiptTracker:
        """The tracker of an :class:`edge_agent.service.EdgeAgent`, hooked into its acknowledgements' commits."""
        config = agent.config  # type: ignore[attr-defined]
        tracker = cls(agent.core, agent.downlinks.emit, agent.counters,  # type: ignore[attr-defined]
                      interval_s=config.receipt_interval_s, enabled=config.receipts,
                      durable_on_touch=agent.receiver is not None)  # type: ignore[attr-defined]
        if config.receipts:
            agent.acks.on_seal, agent.acks.on_durable = tracker.seal, tracker.durable  # type: ignore[attr-defined]
        return tracker

    @property
    def guard(self) -> GapGuard:
        return self.core.registry.features

    def touched(self, device: str | None) -> None:
        """A record message of ``device`` was handled (loop): it is owed a receipt after the covering commit."""
        if device is None or not self.enabled:
            return
        self._pending.add(device)
        if self.durable_on_touch and not self._touch_scheduled:
            # already logged: one seal and flush per turn of the loop, not per record (the log tail hands over
            # records in bursts; a per-record seal cost the receiver process two thirds of its throughput)
            self._touch_scheduled = True
            asyncio.get_running_loop().call_soon(self._logged)

    def _logged(self) -> None:
        self._touch_scheduled = False
        self.seal()
        self.durable()

    def seal(self) -> None:
        """A commit is about to start: snapshot what the guard says of each touched device (loop)."""
        if not self._pending:
            return
        guard = self.guard
        for device in self._pending:
            upto, missing = guard.missing(device, MAX_MISSING)
            if upto is not None:
                self._sealed[device] = (upto, tuple(missing))
        self._pending.clear()
        seen = (guard.fills, guard.abandoned, guard.closed)
        for name, now, before in zip(("receipt_fills", "receipt_gaps_abandoned", "receipt_gaps_closed"), seen,
                                     self._seen, strict=True):
            if now > before:
                self.counters.inc(name, now - before)
        self._seen = seen

    def durable(self) -> None:
        """The commit after the last :meth:`seal` completed: its snapshots may be told (loop)."""
        if not self._sealed:
            return
        self._ready.update(self._sealed)
        self._sealed.clear()
        self.flush()

    def flush(self) -> None:
        """Emit every ready receipt whose device was not told within ``interval_s``; re-arm for the rest."""
        self._timer = None
        now = time.monotonic()
        out: list[Outgoing] = []
        wait: float | None = None
        last_sent = self._last_sent
        for device, (upto, missing) in list(self._ready.items()):
            due = last_sent.get(device, float("-inf")) + self.interval_s
            if now < due:
                wait = due - now if wait is None else min(wait, due - now)
                continue
            del self._ready[device]
            last_sent[device] = now
            try:
                out.append(self.core.down(device, Kind.RECEIPT, Receipt(device, upto, missing)))
            except WireError:  # a bug here must not stop every later receipt: the devices would only probe
                self.counters.inc("receipt_errors")
                log.exception("edge: receipt for %s (upto %d, %d missing) not sent", device, upto, len(missing))
        if out:
            self.counters.inc("receipts_sent", len(out))
            self.emit(out)
        if len(last_sent) > 2 * self.core.registry.max_devices:  # bounded: forget devices told long ago
            for device in [d for d, t in last_sent.items() if now - t > self.interval_s]:
                del last_sent[device]
        if wait is not None and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(wait, self.flush)
