from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from broker import topics
from broker.address import BrokerAddress
from broker.dedup import SequenceGuard
from broker.runners import MosquittoBroker
from broker.wire import (
    CapabilityProfile,
    DeviceConfig,
    FeatureRecord,
    Kind,
    ModalityProfile,
    Prediction,
    decode_envelope,
    encode_envelope,
)
from device_sdk import DeviceClient, Overflow, QueueFullError
from tests.support.collector import Collector


def _record(i: int, device: str = "d1") -> FeatureRecord:
    return FeatureRecord(device, i, {"accel": np.full((10, 3), i, np.float32)}, label=i % 4)


def _features(col: Collector, site: str = "s1") -> list[int]:
    """Sample ids received, after exactly-once de-duplication by envelope seq."""
    guard = SequenceGuard()
    return [env.body["sample"] for t, env in col.envelopes
            if env.kind is Kind.FEATURES and guard.accept(env.sender, env.seq)]


def test_publish_register_and_downlink_round_trip(any_broker: BrokerAddress, tmp_path: Path) -> None:
    got: list[tuple[Kind, Any]] = []
    seen = threading.Event()

    def on_downlink(kind: Kind, msg: Any) -> None:
        got.append((kind, msg))
        if len(got) == 2:
            seen.set()

    with Collector(any_broker, topics.site_device_uplinks("s1")) as col:
        dev = DeviceClient("s1", "d1", any_broker, on_downlink=on_downlink, store_path=tmp_path / "q.sqlite")
        assert dev.connect(10)
        dev.register(CapabilityProfile("d1", {"accel": ModalityProfile((10, 3))}))
        for i in range(300):
            dev.publish(_record(i))
        assert dev.flush(20)
        col.wait_for(301)
        assert _features(col) == list(range(300))
        kinds = [env.kind for _, env in col.envelopes]
        assert kinds.count(Kind.REGISTER) == 1

        # downlink: a config and a prediction reach the callback as typed messages
        pub = col.client
        pub.publish(topics.device_down("s1", "d1", topics.Downlink.CONFIG),
                    encode_envelope(Kind.CONFIG, "edge", 1, DeviceConfig(["accel"]).to_body()), qos=1)
        pub.publish(topics.device_down("s1", "d1", topics.Downlink.PREDICTION),
                    encode_envelope(Kind.PREDICTION, "edge", 2,
                                    Prediction("d1", 5, 2, np.array([0.1, 0.9])).to_body()), qos=1)
        pub.publish(topics.device_down("s1", "d1", topics.Downlink.ERROR), b"\x00garbage", qos=1)
        assert seen.wait(10)
        assert isinstance(got[0][1], DeviceConfig) and got[0][1].modalities == ["accel"]
        assert isinstance(got[1][1], Prediction) and got[1][1].label == 2
        deadline = time.monotonic() + 5
        while dev.counters["rejected"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert dev.counters["rejected.DecodeError"] == 1  # bad downlink counted, loop alive
        assert dev.close(5)


def _wait_offline(dev: DeviceClient) -> None:
    deadline = time.monotonic() + 10
    while dev.online and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not dev.online


def test_store_and_forward_across_broker_restart(tmp_path: Path) -> None:
    broker = MosquittoBroker(persistence=True)
    broker.start()
    addr = BrokerAddress(broker.host, broker.port)
    try:
        col = Collector(addr, topics.site_device_uplinks("s1"), client_id="durable-col", clean_session=False).start()
        dev = DeviceClient("s1", "d1", addr, store_path=tmp_path / "q.sqlite")
        assert dev.connect(10)
        for i in range(300):
            dev.publish(_record(i))
        assert dev.flush(20)
        assert len(col.wait_for(300)) == 300
        broker.stop()
        _wait_offline(dev)
        for i in range(300, 1000):
            dev.publish(_record(i))
        assert len(dev.store) == 700  # offline records wait on disk
        broker.start()
        assert dev.flush(60), f"{dev.pending} records still pending"
        col.wait_for(1000, timeout=60)
        assert _features(col) == list(range(1000))  # every record exactly once, in order
        col.stop()
        dev.close(5)
    finally:
        broker.close()


def test_unacknowledged_records_survive_a_broker_crash(tmp_path: Path) -> None:
    """Records in flight when the broker dies are kept and re-sent: the broker acknowledges all of them."""
    broker = MosquittoBroker(persistence=False)
    broker.start()
    addr = BrokerAddress(broker.host, broker.port)
    try:
        dev = DeviceClient("s1", "d7", addr, store_path=tmp_path / "q.sqlite")
        assert dev.connect(10)
        for i in range(500):
            dev.publish(_record(i, "d7"))
        broker.stop(kill=True)
        _wait_offline(dev)
        assert dev.counters["acked"] + len(dev.store) == 500  # nothing left the SDK's hands un-acked
        broker.start()
        with Collector(addr, topics.site_device_uplinks("s1")) as col:
            assert dev.flush(60)
            assert dev.counters["acked"] == 500
            resent = [env.body["sample"] for _, env in col.wait_for(500 - 0, timeout=5)]
        assert resent == sorted(resent) and len(resent) == len(set(resent))  # re-sent in order, once each
        dev.close(5)
    finally:
        broker.close()


def test_records_stored_offline_survive_a_gateway_restart(tmp_path: Path) -> None:
    """A gateway that booted without a broker, queued records and rebooted still delivers them all."""
    broker = MosquittoBroker()
    addr = BrokerAddress(broker.host, broker.port)
    dev = DeviceClient("s1", "d2", addr, store_path=tmp_path / "q.sqlite", reconnect_max_delay=0.2)
    assert not dev.connect(0.3)
    for i in range(50):
        dev.publish(_record(i, "d2"))
    assert len(dev.store) == 50
    assert not dev.close(0.1)  # not drained: records stay on disk
    try:
        broker.start()
        with Collector(addr, topics.site_device_uplinks("s1")) as col:
            dev = DeviceClient("s1", "d2", addr, store_path=tmp_path / "q.sqlite")
            assert dev.connect(10)
            assert dev.flush(20)
            col.wait_for(50)
            assert _features(col) == list(range(50))
            dev.close(5)
    finally:
        broker.close()


def test_sequence_numbers_survive_restart(tmp_path: Path) -> None:
    dev = DeviceClient("s1", "d3", BrokerAddress("127.0.0.1", 1), store_path=tmp_path / "q.sqlite")
    first = dev.publish(_record(0, "d3"))
    dev.close(0.1)
    dev2 = DeviceClient("s1", "d3", BrokerAddress("127.0.0.1", 1), store_path=tmp_path / "q.sqlite")
    assert dev2.publish(_record(1, "d3")) > first
    assert len(dev2.store) == 2  # the first client's unsent record is still queued
    dev2.close(0.1)


def test_overflow_policies(tmp_path: Path) -> None:
    unreachable = BrokerAddress("127.0.0.1", 1)
    dev = DeviceClient("s1", "d4", unreachable, store_path=tmp_path / "a.sqlite", store_max_records=10)
    for i in range(25):
        dev.publish(_record(i, "d4"))
    assert len(dev.store) == 10 and dev.store.dropped == 15
    queued = [FeatureRecord.from_body(decode_envelope(p).body).sample for _, _, _, p in dev.store.peek(None, 100)]
    assert queued == list(range(15, 25))  # the oldest were dropped
    dev.close(0.1)
    strict = DeviceClient("s1", "d5", unreachable, store_path=tmp_path / "b.sqlite", store_max_records=3,
                          overflow=Overflow.ERROR)
    for i in range(3):
        strict.publish(_record(i, "d5"))
    with pytest.raises(QueueFullError):
        strict.publish(_record(3, "d5"))
    strict.close(0.1)


def test_large_record_is_chunked_end_to_end(mosquitto_addr: BrokerAddress, tmp_path: Path) -> None:
    big = FeatureRecord("d6", 0, {"image": np.random.default_rng(0).random((1024, 1024), dtype=np.float32)})
    with Collector(mosquitto_addr, *topics.subscriptions(topics.site_device_uplinks("s1"))) as col:
        dev = DeviceClient("s1", "d6", mosquitto_addr, store_path=tmp_path / "q.sqlite")
        assert dev.connect(10)
        dev.publish(big)
        assert dev.flush(30)
        deadline = time.monotonic() + 30
        while not (feats := [e for _, e in col.envelopes if e.kind is Kind.FEATURES and e.sender == "d6"]):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        rec = FeatureRecord.from_body(feats[0].body)
        assert np.array_equal(rec.modalities["image"], big.modalities["image"])
        assert sum(1 for t, _, _ in col.raw if "/chunk/" in t) >= 16
        dev.close(5)


def test_sdk_import_stays_light() -> None:
    code = ("import sys, device_sdk; heavy = [m for m in ('torch', 'transformers', 'onnxruntime', 'peft', 'aiomqtt')"
            " if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
