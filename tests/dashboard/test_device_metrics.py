"""A real DeviceClient on a Mosquitto of the test's own publishes its own metrics, retained, under its site:
what the overflow policy dropped, what waited on disk, what the broker acknowledged, the round trip of an
inference request answered over the bus, the last error its edge sent, all matching what the test did."""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt

from broker import topics
from broker.address import BrokerAddress
from broker.runners import MosquittoBroker
from broker.wire import FeatureRecord, Kind, Prediction, encode_envelope
from broker.wire.device import ErrorReport
from device_sdk import DeviceClient
from device_sdk.metrics import percentile
from megace.dashboard.schema import check

SITE, DEV = "site-m", "gw-m"


def _record(sample: int) -> FeatureRecord:
    return FeatureRecord(DEV, sample, {"accel": np.full((1, 3), sample, np.float32)}, label=1)


def _until(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def _retained(addr: BrokerAddress, topic: str) -> dict:
    """The retained document on ``topic``, as a dashboard opening now receives it."""
    got: list[bytes] = []
    ready = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"late-{uuid.uuid4().hex[:6]}")
    c.on_connect = lambda cl, *_: cl.subscribe(topic, 1)
    c.on_message = lambda _c, _u, m: (got.append(bytes(m.payload)), ready.set()) if m.retain else None
    c.connect(addr.host, addr.port)
    c.loop_start()
    try:
        assert ready.wait(10), f"nothing retained on {topic}"
    finally:
        c.disconnect()
        c.loop_stop()
    assert check(topic, got[0]) == []
    return json.loads(got[0])


def test_percentile_is_nearest_rank() -> None:
    assert percentile([], 50) is None
    assert percentile([5.0], 99) == 5.0
    values = [float(v) for v in range(1, 101)]  # 1..100: the p-th percentile is p itself by nearest rank
    assert [percentile(values, q) for q in (1, 50, 99, 100)] == [1.0, 50.0, 99.0, 100.0]
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0


def test_a_device_publishes_its_queue_drops_acks_round_trip_and_last_error(
        fresh_mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    addr = BrokerAddress(fresh_mosquitto.host, fresh_mosquitto.port)
    dev = DeviceClient(SITE, DEV, addr, store_path=tmp_path / "q.sqlite", store_max_records=3,
                       metrics_interval=0.2)
    topic = topics.metrics(topics.Role.DEVICE, DEV, SITE)
    assert dev.metrics.topic == topic == f"megace/v1/metrics/device/{SITE}/{DEV}"
    for i in range(5):  # not connected yet: five records into a queue of three, drop-oldest
        dev.publish(_record(i))
    snap = dev.metrics.snapshot()
    assert (snap["queued"], snap["dropped"], snap["sent"], snap["acked"]) == (3, 2, 5, 0)
    assert snap["online"] is False and snap["overflow"] == "drop-oldest"
    edge = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="edge-stand-in")
    edge.connect(addr.host, addr.port)
    edge.loop_start()
    try:
        assert dev.connect(10)
        assert dev.flush(10)
        sent_at = time.monotonic()  # before the call: the device starts its clock inside it
        seq = dev.request_inference(_record(42))
        time.sleep(0.05)  # the round trip the device must measure: at least this long
        down = topics.device_down(SITE, DEV, topics.Downlink.PREDICTION)
        answer = Prediction(DEV, 42, 1, np.array([0.1, 0.9], np.float32), model_version=3).to_body()
        edge.publish(down, encode_envelope(Kind.PREDICTION, "edge-m", 1, answer), qos=1).wait_for_publish(5)
        _until(lambda: dev.metrics.snapshot()["predictions"] == 1, 10, "the prediction")
        measured_max = (time.monotonic() - sent_at) * 1000
        # about the last record (seq - 1): the request already has its answer, and a second one never reaches the app
        error = ErrorReport("profile_mismatch", "ProfileMismatchError: no such modality", ref=seq - 1).to_body()
        edge.publish(topics.device_down(SITE, DEV, topics.Downlink.ERROR),
                     encode_envelope(Kind.ERROR, "edge-m", 2, error), qos=1).wait_for_publish(5)
        _until(lambda: dev.metrics.snapshot()["last_error"] is not None, 10, "the error")
        time.sleep(0.5)  # two ticks of the publisher
        doc = _retained(addr, topic)
        m = doc["metrics"]
        assert (doc["role"], doc["id"], doc["site"]) == ("device", DEV, SITE)
        assert (m["queued"], m["inflight"], m["dropped"]) == (0, 0, 2)
        assert m["sent"] == 6 and m["sent_by_kind"] == {"features": 5, "infer": 1}
        assert m["acked"] == 4  # the three queued records and the inference request: dropped ones never went out
        assert m["online"] is True and m["connects"] == 1
        rtt = m["rtt_ms"]
        assert rtt["count"] == 1 and rtt["p50"] == rtt["p99"] == rtt["last"]
        assert 50 <= rtt["last"] <= measured_max
        assert m["last_error"]["code"] == "profile_mismatch" and m["last_error"]["ref"] == seq - 1
        assert m["errors_received"] == 1 and m["model_version"] is None
    finally:
        edge.disconnect()
        edge.loop_stop()
        dev.close(5)
    final = _retained(addr, topic)  # published on close: still there for a dashboard opened afterwards
    assert (final["metrics"]["acked"], final["metrics"]["queued"], final["metrics"]["errors_received"]) == (4, 0, 1)
    status = _retained(addr, topics.status(topics.Role.DEVICE, DEV, SITE))
    assert status["state"] == "offline" and status["detail"] == {"site": SITE}
