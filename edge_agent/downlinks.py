"""Downlinks to devices: a bounded queue filled by the core, drained by one sender per connection.

Why a queue and a window: the core decides what to send synchronously while it handles a message,
but a publish waits for the broker. Queueing keeps ingest fast; the window keeps up to ``window``
publishes awaiting their PUBACK at once (order preserved, since aiomqtt writes them in order), so a
slow acknowledgement does not serialize every prediction behind it. A full queue drops (counted)
rather than grows without bound.
"""

from __future__ import annotations

import asyncio

import aiomqtt

from broker.aio import publish_one
from broker.metrics import Counters
from edge_agent.outgoing import Outgoing


class DownlinkQueue:
    """Device downlinks waiting for the broker; :meth:`emit` from the loop, :meth:`send` per connection.

    Args:
        counters: Where ``downlink_dropped`` (queue full) and ``bytes_up`` (sent) are counted.
        maxsize: Downlinks that may wait at once; one more is dropped, not queued.
        window: Publishes that may await their PUBACK at once on one connection.
    """

    def __init__(self, counters: Counters, *, maxsize: int, window: int = 64) -> None:
        self.counters = counters
        self.window = window
        self._queue: asyncio.Queue[Outgoing] = asyncio.Queue(maxsize=maxsize)

    def emit(self, messages: list[Outgoing]) -> None:
        """Queue ``messages`` in order; each that does not fit is dropped and counted."""
        for message in messages:
            try:
                self._queue.put_nowait(message)
            except asyncio.QueueFull:
                self.counters.inc("downlink_dropped")
                if message.done is not None:
                    message.done()

    def qsize(self) -> int:
        return self._queue.qsize()

    def room(self) -> int:
        """How many more downlinks fit now: a paced sender (a model's chunks) waits for room instead of dropping."""
        return self._queue.maxsize - self._queue.qsize()

    def empty(self) -> bool:
        return self._queue.empty()

    async def send(self, client: aiomqtt.Client) -> None:
        """Publish queued downlinks at QoS 1 until cancelled or a publish fails (which ends the session)."""
        slots = asyncio.Semaphore(self.window)
        pending: set[asyncio.Task[None]] = set()
        failed: list[Exception] = []

        async def one(message: Outgoing) -> None:
            try:
                await publish_one(client, message.topic, message.payload, qos=1)
                self.counters.inc("bytes_up", len(message.payload))
                if message.done is not None:
                    message.done()
            except Exception as exc:  # kept for the loop to raise: a done task's own error went unretrieved (logged)
                failed.append(exc)
            finally:
                slots.release()

        try:
            while True:
                message = await self._queue.get()
                await slots.acquire()
                task = asyncio.create_task(one(message))
                pending.add(task)
                task.add_done_callback(pending.discard)
                if failed:
                    raise failed[0]
        finally:
            for task in pending:
                task.cancel()
