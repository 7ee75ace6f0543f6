"""Acknowledge after logging, on a real broker: what is not yet safe is delivered again after a reconnect.

An inference request's acknowledgement waits for its answer; everything after it waits too (MQTT wants
acknowledgements in arrival order). A kill before the answer was handed to the broker therefore loses
no request: the broker delivers it again.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from pathlib import Path

import aiomqtt

from broker.address import BrokerAddress
from broker.aio import make_client
from broker.metrics import Counters
from broker.session import Session, payload_bytes
from edge_agent.acks import DurableAcks
from edge_agent.ingestlog import IngestLog


def session_taking(addr: BrokerAddress, identifier: str, topic: str, acks: DurableAcks, n: int,
                   hold: Callable[[int], bool], got: list[list[bytes]], releases: list) -> Session:
    async def serve(client: aiomqtt.Client, attempt: int) -> None:
        await client.subscribe(topic, qos=1)
        runner = asyncio.create_task(acks.run(client))
        seen: list[bytes] = []
        try:
            async for message in client.messages:
                payload = payload_bytes(message.payload)
                release = acks.received(message, topic, payload, durable=True, hold=hold(len(seen)))
                releases.append(release)
                seen.append(payload)
                if len(seen) == n:
                    break
            await asyncio.sleep(0.5)  # the acknowledgements that may go, go
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
            acks.reset()
            got.append(seen)
    return Session(addr, serve, identifier=identifier, clean_session=False, manual_ack=True)


async def test_a_held_request_and_everything_after_it_come_again(mosquitto_addr: BrokerAddress,
                                                                 tmp_path: Path) -> None:
    topic = f"megace-test/acks/{uuid.uuid4().hex[:8]}"
    identifier = f"acks-{uuid.uuid4().hex[:8]}"
    counters = Counters()
    acks = DurableAcks(IngestLog(tmp_path / "log"), counters, hold_timeout_s=60)
    got: list[list[bytes]] = []
    releases: list = []
    async with make_client(mosquitto_addr, identifier=identifier, clean_session=False) as first:
        await first.subscribe(topic, qos=1)  # the persistent session exists before anything is published
    async with make_client(mosquitto_addr, identifier=f"pub-{uuid.uuid4().hex[:8]}") as pub:
        for i in range(3):
            await pub.publish(topic, str(i).encode(), qos=1)
    # message 1 is an inference request whose answer never went out (the edge died)
    await asyncio.wait_for(session_taking(mosquitto_addr, identifier, topic, acks, 3, lambda i: i == 1, got,
                                          releases).run(), 20)
    assert releases[1] is not None and releases[0] is None and releases[2] is None
    # the next connection gets 1 and 2 again (0 was logged and acknowledged); this time they are answered
    await asyncio.wait_for(session_taking(mosquitto_addr, identifier, topic, acks, 2, lambda i: False, got,
                                          releases).run(), 20)
    assert IngestLog(tmp_path / "log").segments()  # logged frames are on disk
    async with make_client(mosquitto_addr, identifier=f"pub-{uuid.uuid4().hex[:8]}") as pub:
        await pub.publish(topic, b"marker", qos=1)
    await asyncio.wait_for(session_taking(mosquitto_addr, identifier, topic, acks, 1, lambda i: False, got,
                                          releases).run(), 20)
    assert got[0] == [b"0", b"1", b"2"]
    assert got[1] == [b"1", b"2"]
    assert got[2] == [b"marker"]
    acks.close()


async def test_a_request_never_answered_is_acknowledged_after_the_hold_timeout(mosquitto_addr: BrokerAddress,
                                                                               tmp_path: Path) -> None:
    topic = f"megace-test/acks/{uuid.uuid4().hex[:8]}"
    identifier = f"acks-{uuid.uuid4().hex[:8]}"
    counters = Counters()
    acks = DurableAcks(IngestLog(tmp_path / "log"), counters, hold_timeout_s=0.2)
    got: list[list[bytes]] = []
    async with make_client(mosquitto_addr, identifier=identifier, clean_session=False) as first:
        await first.subscribe(topic, qos=1)
    async with make_client(mosquitto_addr, identifier=f"pub-{uuid.uuid4().hex[:8]}") as pub:
        for i in range(2):
            await pub.publish(topic, str(i).encode(), qos=1)
    await asyncio.wait_for(session_taking(mosquitto_addr, identifier, topic, acks, 2, lambda i: i == 0, got,
                                          []).run(), 20)
    assert counters["ack_hold_timeouts"] == 1
    async with make_client(mosquitto_addr, identifier=f"pub-{uuid.uuid4().hex[:8]}") as pub:
        await pub.publish(topic, b"marker", qos=1)
    await asyncio.wait_for(session_taking(mosquitto_addr, identifier, topic, acks, 1, lambda i: False, got,
                                          []).run(), 20)
    assert got == [[b"0", b"1"], [b"marker"]]
    acks.close()
