"""Round trips through real brokers with the asyncio side of the contract."""

from __future__ import annotations

import asyncio
import os

import numpy as np

from broker import aio, topics
from broker.address import BrokerAddress
from broker.inbox import Inbox
from broker.wire import FeatureRecord, GlobalAdapter, Kind, encode_envelope
from broker.wire.bodies import decode_body


async def _roundtrip(addr: BrokerAddress, topic: str, payload: bytes, *, max_packet: int, retain: bool = False):
    inbox = Inbox()
    async with aio.make_client(addr, identifier=f"sub-{os.getpid()}-{id(inbox)}") as sub:
        for f in topics.subscriptions(topic):
            await sub.subscribe(f, qos=1)
        async with aio.make_client(addr, identifier=f"pub-{os.getpid()}-{id(inbox)}") as pub:
            await aio.publish(pub, topic, payload, sender="t", qos=1, retain=retain, max_packet=max_packet)
        async with asyncio.timeout(120):
            async for msg in sub.messages:
                got = inbox.accept(str(msg.topic), msg.payload)
                if got is not None:
                    return got


async def test_feature_round_trip_on_both_brokers(any_broker: BrokerAddress) -> None:
    rec = FeatureRecord("d", 1, {"audio": np.arange(400, dtype=np.float32).reshape(20, 20)}, label=3)
    t = topics.device_up("s", "d", topics.Uplink.FEATURES)
    parsed, env = await _roundtrip(any_broker, t, encode_envelope(Kind.FEATURES, "d", 9, rec.to_body()),
                                   max_packet=1 << 20)
    back = decode_body(env)
    assert parsed.device == "d" and env.seq == 9 and back.label == 3
    assert np.array_equal(back.modalities["audio"], rec.modalities["audio"])


async def test_chunked_64_mib_over_mosquitto(mosquitto_addr: BrokerAddress) -> None:
    tensors = {"w": np.random.default_rng(1).integers(0, 255, 64 * 1024 * 1024, dtype=np.uint8)}
    g = GlobalAdapter(1, "fp", "fedavg", 8, 16.0, tensors)
    payload = encode_envelope(Kind.GLOBAL, "cloud", 1, g.to_body())
    parsed, env = await _roundtrip(mosquitto_addr, topics.global_down(), payload, max_packet=1 << 20)
    back = decode_body(env)
    assert parsed.channel is topics.Channel.GLOBAL_DOWN
    assert np.array_equal(back.tensors["w"], tensors["w"])


async def test_chunked_retained_transfer_reaches_late_subscriber(embedded_addr: BrokerAddress) -> None:
    g = GlobalAdapter(3, "fp", "fedavg", 8, 16.0, {"w": np.ones(100_000, np.float32)})
    payload = encode_envelope(Kind.GLOBAL, "cloud", 3, g.to_body())
    topic = topics.site_feedback("late")
    async with aio.make_client(embedded_addr, identifier="retain-pub") as pub:
        await aio.publish(pub, topic, payload, sender="cloud", retain=True, max_packet=64 * 1024)
    inbox = Inbox()
    async with aio.make_client(embedded_addr, identifier="retain-sub") as sub:
        for f in topics.subscriptions(topic):
            await sub.subscribe(f, qos=1)
        async with asyncio.timeout(30):
            async for msg in sub.messages:
                if (got := inbox.accept(str(msg.topic), msg.payload)) is not None:
                    break
    assert decode_body(got[1]).version == 3
