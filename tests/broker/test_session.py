"""The services' one connection helper (``broker.session``) on a real Mosquitto: reconnects, backoff, drops."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import aiomqtt
import pytest

from broker.address import BrokerAddress
from broker.aio import make_client
from broker.metrics import Counters
from broker.session import CountingQueue, Session, ack, backoff_delay, payload_bytes


async def until(predicate: Callable[[], Any], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


def test_payload_bytes_covers_every_payload_type_aiomqtt_declares() -> None:
    assert payload_bytes(b"ab") == b"ab"
    assert payload_bytes(bytearray(b"ab")) == b"ab" and type(payload_bytes(bytearray(b"ab"))) is bytes
    assert (payload_bytes("é"), payload_bytes(3), payload_bytes(1.5), payload_bytes(None)) == (
        b"\xc3\xa9", b"3", b"1.5", b"")


def test_backoff_doubles_up_to_the_cap_and_jitter_only_shortens() -> None:
    assert [backoff_delay(n, 0.2, 10.0, 0.0) for n in range(8)] == pytest.approx(
        [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0])
    assert backoff_delay(10_000, 0.2, 10.0, 0.0) == 10.0
    for n in range(8):
        nominal = min(10.0, 0.2 * 2**n)
        for _ in range(50):
            assert nominal * 0.5 <= backoff_delay(n, 0.2, 10.0, 0.5) <= nominal


def test_counting_queue_counts_and_refuses_like_a_full_queue() -> None:
    counters = Counters()
    queue = CountingQueue.counting_into(counters)(maxsize=1)
    queue.put_nowait("first")  # type: ignore[arg-type]
    for _ in range(2):
        with pytest.raises(asyncio.QueueFull):
            queue.put_nowait("more")  # type: ignore[arg-type]
    assert counters["mqtt_dropped"] == 2 and queue.qsize() == 1 and queue.get_nowait() == "first"


async def test_reconnects_after_a_broker_restart_and_starts_the_backoff_over(fresh_mosquitto) -> None:
    broker = fresh_mosquitto
    counters = Counters()
    errors: list[int] = []  # one entry per attempt or session that a broker error ended (the test's own tally)
    sessions: asyncio.Queue[tuple[int, int]] = asyncio.Queue()  # (attempt given to serve, errors seen before)

    async def serve(client: aiomqtt.Client, attempt: int) -> None:
        await sessions.put((attempt, len(errors)))
        async for _ in client.messages:  # until the broker goes away
            pass

    session = Session(BrokerAddress(broker.host, broker.port), serve, identifier=f"session-{uuid.uuid4().hex[:8]}",
                      counters=counters, base_delay=0.05, max_delay=0.2, on_error=lambda: errors.append(len(errors)),
                      stable_after=0.0)
    task = asyncio.create_task(session.run())
    try:
        assert await asyncio.wait_for(sessions.get(), 10) == (0, 0)
        for outage in (1, 2):
            before = len(errors)
            broker.stop()
            # the session is lost (one error), then at least three attempts are refused
            await until(lambda b=before: len(errors) >= b + 4, f"refused attempts in outage {outage}")
            broker.start()
            attempt, seen = await asyncio.wait_for(sessions.get(), 30)
            refused = seen - before - 1
            # the attempt number counts this outage's refused tries only: it started over after
            # the healthy session (counted across outages it would be larger in outage 2)
            assert refused >= 3 and attempt == refused, (outage, attempt, seen, before)
        assert counters["connects"] == 3 and counters["disconnects"] == 2
        assert counters["connect_failures"] == len(errors) - 2
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_sessions_that_end_at_once_back_off_instead_of_looping(mosquitto_addr) -> None:
    """Two clients with one client id knock each other off: without backoff they would reconnect thousands of
    times a second; with it each waits 0.2, 0.4, 0.8, ... s after a session shorter than ``stable_after``."""
    ident = f"clash-{uuid.uuid4().hex[:8]}"

    async def serve(client: aiomqtt.Client, attempt: int) -> None:
        async for _ in client.messages:
            pass

    counters = [Counters(), Counters()]
    tasks = [asyncio.create_task(Session(mosquitto_addr, serve, identifier=ident, counters=c, base_delay=0.2).run())
             for c in counters]
    try:
        await until(lambda: sum(c["disconnects"] + c["connect_failures"] for c in counters) >= 3,
                    "the two clients to clash")
        start = sum(c["connects"] for c in counters)
        await asyncio.sleep(3.0)  # a window to count reconnects in, not a wait for an outcome
        more = sum(c["connects"] for c in counters) - start
        # backoff doubling from 0.2 s allows at most ~5 connects per client in 3 s; a tight loop makes hundreds
        assert more <= 12, more
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_full_incoming_queue_counts_every_message_it_drops(mosquitto_addr) -> None:
    n, size = 30, 3
    topic = f"megace-test/drops/{uuid.uuid4().hex[:8]}"
    counters = Counters()
    subscribed = asyncio.Event()
    kept: list[bytes] = []

    async def serve(client: aiomqtt.Client, attempt: int) -> None:
        await client.subscribe(topic, qos=1)
        subscribed.set()
        # nothing is read until every message has arrived: all but the first ``size`` are dropped
        await until(lambda: counters["mqtt_dropped"] >= n - size, "the drops")
        for _ in range(len(client.messages)):
            kept.append(payload_bytes((await anext(aiter(client.messages))).payload))

    session = Session(mosquitto_addr, serve, identifier=f"drops-{uuid.uuid4().hex[:8]}", counters=counters,
                      max_queued_incoming=size)
    task = asyncio.create_task(session.run())
    try:
        await asyncio.wait_for(subscribed.wait(), 10)
        async with make_client(mosquitto_addr, identifier=f"drops-pub-{uuid.uuid4().hex[:8]}") as pub:
            for i in range(n):
                await pub.publish(topic, str(i).encode(), qos=1)
        await asyncio.wait_for(task, 30)
        assert counters["mqtt_dropped"] == n - size
        assert kept == [str(i).encode() for i in range(size)]  # the queue kept the first ones, in order
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_with_manual_ack_only_acknowledged_messages_are_not_delivered_again(mosquitto_addr) -> None:
    topic = f"megace-test/ack/{uuid.uuid4().hex[:8]}"
    identifier = f"ack-{uuid.uuid4().hex[:8]}"
    rounds: list[list[bytes]] = []

    def serve_acking(n_ack: int, expect: int) -> Callable[[aiomqtt.Client, int], Any]:
        async def serve(client: aiomqtt.Client, attempt: int) -> None:
            await client.subscribe(topic, qos=1)
            got: list[bytes] = []
            async for message in client.messages:
                got.append(payload_bytes(message.payload))
                if len(got) <= n_ack:
                    ack(client, message)
                if len(got) == expect:
                    break
            await asyncio.sleep(0.3)  # let the PUBACKs reach the broker before the session ends
            rounds.append(got)
        return serve

    def session(n_ack: int, expect: int) -> Session:
        return Session(mosquitto_addr, serve_acking(n_ack, expect), identifier=identifier, clean_session=False,
                       manual_ack=True)

    # a persistent session exists before anything is published
    async with make_client(mosquitto_addr, identifier=identifier, clean_session=False) as first:
        await first.subscribe(topic, qos=1)
    async with make_client(mosquitto_addr, identifier=f"ack-pub-{uuid.uuid4().hex[:8]}") as pub:
        for i in range(5):
            await pub.publish(topic, str(i).encode(), qos=1)
    await asyncio.wait_for(session(2, 5).run(), 20)  # acknowledges 0 and 1 only
    await asyncio.wait_for(session(3, 3).run(), 20)  # 2, 3, 4 come again; acknowledged now
    async with make_client(mosquitto_addr, identifier=f"ack-pub-{uuid.uuid4().hex[:8]}") as pub:
        await pub.publish(topic, b"marker", qos=1)
    await asyncio.wait_for(session(1, 1).run(), 20)  # nothing of the old ones is left: the marker is next
    assert rounds == [[b"0", b"1", b"2", b"3", b"4"], [b"2", b"3", b"4"], [b"marker"]]
