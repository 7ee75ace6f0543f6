"""Receipts recover what a real broker acknowledged and then threw away: Mosquitto's full offline queue.

Mosquitto 2.0.11 with ``max_queued_messages N`` PUBACKs every QoS 1 publish but keeps only N for an offline
persistent subscriber and drops the rest (checked first, below, with raw paho clients). The edge goes offline
(a clean stop: its persistent session stays), the device publishes more records than the queue holds, the edge
comes back. With receipts the edge ends with every record exactly once (the device re-sends what no receipt
covered); the same run without receipts loses exactly the records Mosquitto dropped, so the test can fail.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

import broker.runners.mosquitto as mosquitto_runner
from broker.address import BrokerAddress
from broker.runners.mosquitto import CONFIG_TEMPLATE, MosquittoBroker
from broker.wire import FeatureRecord
from device_sdk import DeviceClient
from tests.support.edge_testkit import edge_config, eventually, running, toy_profile

QUEUE = 12
"""Mosquitto's ``max_queued_messages`` for these tests: what an offline subscriber's session may hold."""
BEFORE, OFFLINE = 10, 40
"""Records published while the edge is up, then while it is away (more than the queue holds)."""


class SmallQueueMosquitto(MosquittoBroker):
    """A Mosquitto whose offline queues hold ``QUEUE`` messages (QoS 0 not queued at all)."""

    def start(self) -> MosquittoBroker:
        template = CONFIG_TEMPLATE.replace("max_queued_messages 0",
                                           f"max_queued_messages {QUEUE}\nqueue_qos0_messages false")
        assert template != CONFIG_TEMPLATE
        original = mosquitto_runner.CONFIG_TEMPLATE
        mosquitto_runner.CONFIG_TEMPLATE = template
        try:
            return super().start()
        finally:
            mosquitto_runner.CONFIG_TEMPLATE = original


@pytest.fixture
def small_queue() -> SmallQueueMosquitto:
    broker = SmallQueueMosquitto()
    broker.start()
    try:
        yield broker
    finally:
        broker.close()


def test_mosquitto_acknowledges_then_drops_beyond_the_offline_queue(small_queue: SmallQueueMosquitto) -> None:
    """The premise: every publish is PUBACKed, only ``QUEUE`` reach the persistent subscriber that was away."""
    got: list[bytes] = []
    topic = f"t/{uuid.uuid4().hex[:6]}"

    def subscriber() -> mqtt.Client:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="sub-" + topic[2:], clean_session=False)
        c.on_message = lambda _c, _u, msg: got.append(msg.payload)
        c.connect(small_queue.host, small_queue.port)
        c.loop_start()
        return c

    sub = subscriber()
    sub.subscribe(topic, qos=1)
    time.sleep(0.3)
    sub.disconnect()
    sub.loop_stop()
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="pub-" + topic[2:])
    acked: list[int] = []
    pub.on_publish = lambda _c, _u, mid, _rc, _p: acked.append(mid)
    pub.connect(small_queue.host, small_queue.port)
    pub.loop_start()
    for i in range(OFFLINE):
        info = pub.publish(topic, str(i).encode(), qos=1)
        info.wait_for_publish(5)
        assert info.is_published()
    pub.disconnect()
    pub.loop_stop()
    assert len(acked) == OFFLINE
    sub = subscriber()
    time.sleep(1.0)
    sub.disconnect()
    sub.loop_stop()
    assert got == [str(i).encode() for i in range(QUEUE)]  # the oldest kept, the newest dropped


def _record(device: str, index: int) -> FeatureRecord:
    """A record whose ``env`` values carry its index, so the edge's replay buffer says which arrived."""
    return FeatureRecord(device, index, {"imu": np.zeros((4, 6), np.float32),
                                         "env": np.full(8, float(index), np.float32)}, label=index % 2)


async def _scenario(tmp_path: Path, broker: SmallQueueMosquitto, *,
                    receipts: bool) -> tuple[Counter[int], DeviceClient]:
    addr = BrokerAddress(broker.host, broker.port)
    config = edge_config(tmp_path / "edge", addr, {
        "receipts": receipts,
        "training": {"min_new_samples": 100_000},
        "limits": {"replay_max_total": 100_000, "replay_max_per_device": 100_000},
    })
    device = "gw1"
    dev = DeviceClient(config.site, device, addr, store_path=tmp_path / "dev.sqlite", receipt_timeout_s=1.0,
                       metrics_interval=0)
    try:
        async with running(config):
            assert await asyncio.to_thread(dev.connect, 10.0)
            await asyncio.to_thread(dev.register, toy_profile(device))
            await eventually(lambda: dev.counters["received.config"] >= 1, 10, "the edge's config")
            assert dev._book.enabled is receipts
            for i in range(BEFORE):
                await asyncio.to_thread(dev.publish, _record(device, i))
            assert await asyncio.to_thread(dev.wait_delivered, 20.0)
        # the edge is away (clean stop, its session persists): the broker acknowledges all, queues QUEUE
        for i in range(BEFORE, BEFORE + OFFLINE):
            await asyncio.to_thread(dev.publish, _record(device, i))
        assert await asyncio.to_thread(dev.flush, 10.0)
        assert dev.counters["acked"] >= BEFORE + OFFLINE
        async with running(config) as agent:
            assert await asyncio.to_thread(dev.wait_delivered, 30.0)
            assert agent.trainer is not None
            buffer = agent.trainer.buffer

            def arrived() -> Counter[int]:
                return Counter(int(s.modalities["env"][0]) for s in buffer.snapshot() if s.device_id == device)

            await eventually(lambda: sum(arrived().values()) >= BEFORE + QUEUE, 15, "the queued records")
            await asyncio.sleep(1.0)  # a record re-sent or delivered twice would have arrived by now
            return arrived(), dev
    finally:
        await asyncio.to_thread(dev.close, 5.0)


async def test_receipts_recover_every_record_mosquitto_dropped(tmp_path: Path,
                                                               small_queue: SmallQueueMosquitto) -> None:
    arrived, dev = await _scenario(tmp_path, small_queue, receipts=True)
    assert arrived == Counter(range(BEFORE + OFFLINE))  # every record, exactly once
    assert dev.counters["resent"] >= OFFLINE - QUEUE  # what Mosquitto dropped went again, same seq
    assert dev.counters["receipted"] >= BEFORE + OFFLINE
    assert dev.unreceipted == 0


async def test_without_receipts_the_same_run_loses_what_mosquitto_dropped(tmp_path: Path,
                                                                          small_queue: SmallQueueMosquitto) -> None:
    arrived, dev = await _scenario(tmp_path, small_queue, receipts=False)
    assert arrived == Counter(range(BEFORE + QUEUE))  # the queue's worth; the rest is gone
    assert dev.counters["resent"] == 0


async def test_a_restarted_device_is_receipted_past_the_seqs_it_skipped(tmp_path: Path,
                                                                         mosquitto_addr: BrokerAddress) -> None:
    """A restarted device numbers from a fresh seq block; its registration's ``resend_from`` tells the edge that
    the unused rest of the old block is no gap (else every receipt would stop below it and hold the device up)."""
    config = edge_config(tmp_path / "edge", mosquitto_addr, {"training": {"min_new_samples": 100_000}})
    seqs: list[list[int]] = []
    async with running(config) as agent:
        for boot in range(2):
            dev = DeviceClient(config.site, "gw1", mosquitto_addr, store_path=tmp_path / "dev.sqlite",
                               metrics_interval=0)
            try:
                assert await asyncio.to_thread(dev.connect, 10.0)
                await asyncio.to_thread(dev.register, toy_profile("gw1"))
                await eventually(lambda d=dev: d._book.enabled, 10, "receipts announced")
                seqs.append([await asyncio.to_thread(dev.publish, _record("gw1", boot * 5 + i)) for i in range(5)])
                assert await asyncio.to_thread(dev.wait_delivered, 10.0), f"boot {boot}: {dev.unreceipted} held"
                assert dev.counters["receipted"] == 5
            finally:
                await asyncio.to_thread(dev.close, 5.0)
        assert seqs[0][-1] < 1000 <= seqs[1][0]  # the second boot skipped the rest of the first seq block
        guard = agent.registry.features
        assert "gw1" not in guard.holes and guard.last["gw1"] == seqs[1][-1] and guard.abandoned == 0
