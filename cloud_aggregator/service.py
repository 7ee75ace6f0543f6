"""The cloud aggregator service: the asyncio/MQTT shell around ``AggregatorCore``.

One aiomqtt client per connection attempt (``async with``), a persistent session
(``clean_session=False``) so uploads sent while the cloud restarts are queued by the broker,
and one single-worker executor that runs every core call: numpy maths and fsyncs never block
the event loop, and core calls never overlap.  A lock makes "handle a message, then publish
what it produced" atomic with respect to the timer and to shutdown.

With a PostgreSQL ledger (``[ledger] url``) several replicas run this service and one is active: a replica
stands by (no MQTT connection, no aggregation) until it holds the lease (``leader.py``), then opens the core
and serves under the one client id all replicas share, so the broker's persistent session queues uploads
while no replica is active and hands them to the next one.  A replica that loses the lease stops its session
at once (no offline status: the topics are the new leader's) and stands by again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import aiomqtt

from broker import topics
from broker.address import BrokerAddress
from broker.aio import publish_one
from broker.chunking import frames
from broker.metrics import Counters
from broker.session import Session, payload_bytes
from broker.topics import Role
from broker.wire.status import OFFLINE, ONLINE, Status

from .config import CloudConfig
from .core import AggregatorCore
from .ledger_base import LeaseLost
from .messages import Outgoing
from .reference import open_reference

if TYPE_CHECKING:
    from .leader import Lease

log = logging.getLogger(__name__)
T = TypeVar("T")


class CloudAggregator:
    """``await CloudAggregator(config).run(stop)`` serves until ``stop`` is set (or the task is cancelled)."""

    def __init__(self, config: CloudConfig) -> None:
        self.config = config
        self.core: AggregatorCore | None = None
        #: set once the first session is subscribed and has announced the global (tests, health checks)
        self.ready = asyncio.Event()
        self._pool: ThreadPoolExecutor | None = None
        self._busy = asyncio.Lock()
        self._retained_chunks: dict[str, int] = {}
        #: connection counters kept by the :class:`~broker.session.Session` (connects, drops, ...)
        self.counters = Counters()

    async def run(self, stop: asyncio.Event | None = None) -> None:
        stop = stop or asyncio.Event()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="megace-cloud") as pool:
            self._pool = pool
            if self.config.ledger.replicated:
                await self._replica(stop)
            else:
                await self._active(stop, None)

    async def _active(self, stop: asyncio.Event, lease: Lease | None) -> None:
        """Open the core (fenced by the lease's epoch when replicated) and serve until stopped or deposed."""
        epoch = None if lease is None else lease.epoch
        self._retained_chunks.clear()  # another replica may have re-framed the retained topics meanwhile
        self.core = await self._call(AggregatorCore, self.config, time.monotonic, epoch)
        try:
            await self._serve(stop, None if lease is None else lease.lost)
        finally:
            await self._call(self.core.close)

    async def _replica(self, stop: asyncio.Event) -> None:
        """Stand by, lead while the lease holds, stand by again after losing it; until ``stop``."""
        from .leader import Lease, holder_name  # psycopg only where PostgreSQL is configured

        cfg = self.config
        # a warm standby: the frozen base's reference is built now, not after a takeover
        await self._call(lambda: open_reference(Path(cfg.state_dir), cfg.model, need_initial=True))
        lease = Lease(cfg.ledger.url, holder_name(cfg.cloud_id), poll_s=cfg.ledger.poll_s,
                      heartbeat_s=cfg.ledger.heartbeat_s)
        log.info("cloud %s standing by for the lease", cfg.cloud_id)
        while await lease.acquire(stop):
            self.counters.inc("leader_terms")
            watch = asyncio.create_task(lease.watch())
            try:
                await self._active(stop, lease)
            except LeaseLost as exc:
                log.warning("cloud %s stepped down: %s", cfg.cloud_id, exc)
            finally:
                watch.cancel()
                await asyncio.gather(watch, return_exceptions=True)
                await lease.release()

    # ---- connection ------------------------------------------------------------------------
    async def _serve(self, stop: asyncio.Event, lost: asyncio.Event | None = None) -> None:
        serve = asyncio.create_task(self._connect_loop(stop))
        stopped = asyncio.create_task(stop.wait())
        deposed = asyncio.create_task((lost or asyncio.Event()).wait())
        try:
            await asyncio.wait({serve, stopped, deposed}, return_when=asyncio.FIRST_COMPLETED)
            if deposed.done() and not serve.done():  # no grace, nothing more published: the topics are not ours
                serve.cancel()
                raise LeaseLost("lease lost while serving")
            if not serve.done():  # stop requested: the session winds down by itself, within a grace period
                try:
                    await asyncio.wait_for(asyncio.shield(serve), self.config.limits.shutdown_grace_s)
                except TimeoutError:
                    log.warning("shutdown grace period over; cancelling")
            if serve.done():
                serve.result()
        finally:
            for t in (serve, stopped, deposed):
                t.cancel()
            await asyncio.gather(serve, stopped, deposed, return_exceptions=True)

    async def _connect_loop(self, stop: asyncio.Event) -> None:
        cfg = self.config
        status_topic = topics.status(Role.CLOUD, cfg.cloud_id)
        offline = Status(role=Role.CLOUD.value, id=cfg.cloud_id, state=OFFLINE).encode()
        session = Session(
            BrokerAddress.from_url(cfg.broker),
            lambda client, attempt: self._session(client, stop, attempt),
            identifier=f"megace-cloud-{cfg.cloud_id}",
            counters=self.counters,
            will=aiomqtt.Will(status_topic, offline, qos=1, retain=True),
            clean_session=False,
            on_error=self._retained_chunks.clear,
            name=f"cloud {cfg.cloud_id}",
        )
        await session.run(stop)

    async def _session(self, client: aiomqtt.Client, stop: asyncio.Event, attempt: int) -> None:
        cfg, core = self.config, self._core
        for f in topics.subscriptions(topics.all_adapter_uplinks()):
            await client.subscribe(f, qos=1)
        await self._call(core.check_lease)  # a deposed replica that has not noticed yet announces nothing
        await self._publish_status(client, ONLINE)
        async with self._busy:
            await self._send(client, await self._call(core.announce))
        self.ready.set()
        log.info("cloud %s online at %s (attempt %d)", cfg.cloud_id, cfg.broker, attempt)
        tasks = [
            asyncio.create_task(self._receive(client)),
            asyncio.create_task(self._timer(client)),
            asyncio.create_task(self._metrics(client)),
        ]
        stopped = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait({*tasks, stopped}, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not stopped:
                    t.result()  # a broker error ends the session (and reconnects)
            async with self._busy:  # the message or aggregation in progress finishes first
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await self._send(client, [await self._call(core.metrics_message)])
                await self._publish_status(client, OFFLINE)
        finally:
            for t in (*tasks, stopped):
                t.cancel()
        log.info("cloud %s stopped at version %d", cfg.cloud_id, core.version)

    # ---- loops -----------------------------------------------------------------------------
    async def _receive(self, client: aiomqtt.Client) -> None:
        core = self._core
        async for msg in client.messages:
            payload = payload_bytes(msg.payload)
            async with self._busy:
                try:
                    out = await self._call(core.ingest, str(msg.topic), payload)
                except LeaseLost:
                    raise  # another replica leads now: stop serving (the edge resends what is unacknowledged)
                except Exception:  # a bug must cost one message, not the service
                    log.exception("failed to handle a message on %s", msg.topic)
                    continue
                await self._send(client, out)

    async def _timer(self, client: aiomqtt.Client) -> None:
        """FedBuff's time trigger: aggregate a non-full buffer once its window has run out."""
        core = self._core
        while True:
            deadline = core.buffer.next_deadline()
            await asyncio.sleep(min(max(deadline - time.monotonic(), 0.05), 1.0))
            async with self._busy:
                await self._send(client, await self._call(core.maybe_aggregate))

    async def _metrics(self, client: aiomqtt.Client) -> None:
        core = self._core
        while True:
            await asyncio.sleep(self.config.limits.metrics_period_s)
            async with self._busy:
                await self._send(client, [await self._call(core.metrics_message)])

    # ---- helpers ---------------------------------------------------------------------------
    async def _send(self, client: aiomqtt.Client, messages: list[Outgoing]) -> None:
        core, max_packet = self._core, self.config.limits.max_packet_bytes
        for m in messages:
            parts = frames(m.topic, m.payload, sender=self.config.cloud_id, seq=m.seq, max_packet=max_packet)
            if m.retain:
                await self._clear_retained(client, m.topic, len(parts) if len(parts) > 1 else 0)
            for topic, payload in parts:
                await publish_one(client, topic, payload, qos=1, retain=m.retain)
                core.sent(len(payload))

    async def _clear_retained(self, client: aiomqtt.Client, topic: str, chunks: int) -> None:
        """Retained leftovers of another framing must go, or a late subscriber could rebuild an old
        version from them: the whole-message topic when now chunked, surplus chunk topics when fewer."""
        before = self._retained_chunks.get(topic)
        stale = []
        if chunks and before != chunks:
            stale.append(topic)
        if before:
            stale += [topics.chunk(topic, i) for i in range(chunks, before)]
        for t in stale:
            await client.publish(t, b"", qos=1, retain=True)  # an empty retained payload deletes it
        self._retained_chunks[topic] = chunks

    async def _publish_status(self, client: aiomqtt.Client, state: str) -> None:
        core = self._core
        detail = {"version": core.version, "strategy": core.strategy.name}
        doc = Status(role=Role.CLOUD.value, id=self.config.cloud_id, state=state, detail=detail).encode()
        await client.publish(topics.status(Role.CLOUD, self.config.cloud_id), doc, qos=1, retain=True)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        assert self._pool is not None
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    @property
    def _core(self) -> AggregatorCore:
        assert self.core is not None, "run() has not opened the core"
        return self.core


@contextlib.asynccontextmanager
async def running(config: CloudConfig, timeout: float = 60.0):  # type: ignore[no-untyped-def]
    """Run an aggregator in a task until the block exits (tests, ``megace run``); yields it once ready."""
    agg = CloudAggregator(config)
    stop = asyncio.Event()
    task = asyncio.create_task(agg.run(stop))
    ready = asyncio.create_task(agg.ready.wait())
    try:
        await asyncio.wait({task, ready}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()
        if not agg.ready.is_set():
            raise TimeoutError("cloud aggregator did not come up")
        yield agg
    finally:
        ready.cancel()
        stop.set()
        await task
