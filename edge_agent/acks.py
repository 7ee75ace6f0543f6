"""Acknowledge after logging: the broker hears that the edge has a message only once it is on disk.

The service hands every received message to :meth:`DurableAcks.received` after the core handled it;
a message that changed state (a buffered sample, a registration) is appended to the
:class:`~edge_agent.ingestlog.IngestLog`. One task per connection (:meth:`DurableAcks.run`) commits
the log in groups on its own I/O thread and then acknowledges, in arrival order, everything received
up to that commit. A crash before the acknowledgement means the broker delivers the message again;
the edge's sequence guard drops it if it had been logged and replayed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import aiomqtt

from broker.aio import wait_event
from broker.metrics import Counters
from broker.session import ack
from edge_agent.ingestlog import IngestLog

log = logging.getLogger(__name__)


class Ackable(Protocol):
    """A received message as :func:`broker.session.ack` needs it: aiomqtt's, or paho's (the receiver process)."""

    mid: int
    qos: int
    retain: bool


@dataclass(slots=True)
class _Entry:
    message: Ackable
    index: int
    ready: bool
    deadline: float


class DurableAcks:
    """Group commit of the ingest log, then the manual acknowledgements it covers.

    Args:
        ingest_log: Where state-changing device messages go before they are acknowledged.
        hold_timeout_s: The longest an inference request's acknowledgement waits for its answer.
        counters: Where ``ingest_logged`` (frames), ``ingest_commits`` (fsync groups) and
            ``ingest_log_failures`` (commits the disk refused; retried, nothing acknowledged meanwhile)
            are counted.
        retry_s: Wait before retrying a refused commit.
    """

    def __init__(self, ingest_log: IngestLog, counters: Counters, *, retry_s: float = 0.5,
                 hold_timeout_s: float = 10.0, on_commit: Callable[[], None] | None = None,
                 hold_acks: Callable[[], bool] | None = None) -> None:
        self.on_commit = on_commit
        """Called after each commit (a receiver process tells its reader that the log grew)."""
        self.on_seal: Callable[[], None] | None = None
        self.on_durable: Callable[[], None] | None = None
        """Called just before each commit cycle and after it completed (:mod:`edge_agent.receipts`: a receipt
        reports what was received before the seal, once the commit made it durable)."""
        self.hold_acks = hold_acks
        """While it returns True, nothing is acknowledged (commits go on): back-pressure, since the broker
        sends a subscriber no more than its in-flight window of unacknowledged messages."""
        self.log = ingest_log
        self.counters = counters
        self.retry_s = retry_s
        self.hold_timeout_s = hold_timeout_s
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="megace-ingest-log")
        self._waiting: deque[_Entry] = deque()
        self._received = 0  # entries ever queued (this connection)
        self._durable = 0  # entries queued before the last completed commit
        self._wake = asyncio.Event()
        self._holding = False

    def wake(self) -> None:
        """Re-check ``hold_acks`` now (the reader caught up)."""
        self._wake.set()

    def received(self, message: Ackable, topic: str, payload: bytes, *, durable: bool,
                 hold: bool = False) -> Callable[[], None] | None:
        """Note one handled message (loop thread); ``durable`` ones are logged before any later ack.

        With ``hold`` (an inference request) the acknowledgement also waits for the returned callback,
        which the service calls once the answer is handed to the broker: an edge killed before that
        leaves the request unacknowledged, and the broker delivers it again (or ``hold_timeout_s``
        passes, counted as ``ack_hold_timeouts``)."""
        if durable:
            self.log.append(topic, payload, bool(message.retain))
            self.counters.inc("ingest_logged")
        if message.qos == 0:
            return None
        entry = _Entry(message, self._received, not hold, time.monotonic() + self.hold_timeout_s)
        self._received += 1
        self._waiting.append(entry)
        self._wake.set()
        if not hold:
            return None

        def release() -> None:
            entry.ready = True
            self._wake.set()
        return release

    async def run(self, client: aiomqtt.Client) -> None:
        """For one connection: commit, then acknowledge in arrival order, until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            timeout = None
            if self._waiting and not self._waiting[0].ready:
                timeout = max(self._waiting[0].deadline - time.monotonic(), 0.0)
            await wait_event(self._wake, timeout)
            self._wake.clear()
            queued = self._received
            committed = False
            if self.on_seal is not None:
                self.on_seal()
            while True:
                try:
                    if self.log.pending:
                        await loop.run_in_executor(self._pool, self.log.commit)
                        self.counters.inc("ingest_commits")
                        committed = True
                    break
                except OSError:
                    self.counters.inc("ingest_log_failures")
                    log.exception("ingest log commit failed; retrying without acknowledging")  # pragma: no mutate
                    await asyncio.sleep(self.retry_s)
            self._durable = max(self._durable, queued)
            if self.on_durable is not None:
                self.on_durable()
            if committed and self.on_commit is not None:
                self.on_commit()
            if self.hold_acks is not None and self.hold_acks():
                if not self._holding:
                    self._holding = True
                    self.counters.inc("ingest_backpressure")  # episodes; wake() resumes
                continue
            self._holding = False
            self._ack_ready(client)

    def _ack_ready(self, client: aiomqtt.Client, *, force: bool = False) -> None:
        """Acknowledge, in arrival order, what the last commit covers (``force``: hold no request back)."""
        now = time.monotonic()
        while self._waiting and self._waiting[0].index < self._durable:
            head = self._waiting[0]
            if not head.ready and not force:
                if now < head.deadline:
                    break  # later messages wait too: MQTT wants acknowledgements in arrival order
                self.counters.inc("ack_hold_timeouts")
            self._waiting.popleft()
            ack(client, head.message)

    def reset(self) -> None:
        """A connection ended: what it left un-acknowledged, the broker delivers again on the next one.

        Called when a session ends, not when the next starts: its first messages may arrive before
        :meth:`run` does."""
        self._waiting.clear()
        self._received = self._durable = 0

    def mark(self) -> int:
        """A checkpoint snapshot is being taken: later messages go to a new segment (see IngestLog.mark)."""
        return self.log.mark()

    async def checkpointed(self, segment: int) -> None:
        """The checkpoint holding everything before ``segment`` committed: its older segments can go."""
        await asyncio.get_running_loop().run_in_executor(self._pool, self.log.drop_before, segment)

    async def flush(self) -> None:
        """Commit what is buffered (shutdown)."""
        await asyncio.get_running_loop().run_in_executor(self._pool, self.log.commit)

    async def drain(self, client: aiomqtt.Client) -> None:
        """Commit and acknowledge everything received (a clean shutdown; back-pressure no longer matters)."""
        queued = self._received
        if self.on_seal is not None:
            self.on_seal()
        await self.flush()
        self.counters.inc("ingest_commits")
        self._durable = max(self._durable, queued)
        if self.on_durable is not None:
            self.on_durable()
        if self.on_commit is not None:
            self.on_commit()
        self._ack_ready(client, force=True)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.log.close()
