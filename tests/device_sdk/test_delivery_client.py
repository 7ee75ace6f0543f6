"""The client's request mixin (``device_sdk.requests.InferenceRequests``) in a real DeviceClient on a real
Mosquitto, and the harness the receipt mixin's tests (test_delivery_receipts_client.py) share.

Why here and not only in the book's own tests: the mixin decides *what* goes on the wire again (the same bytes,
chunked like the first publish, never while the last publish is still unacknowledged or queued on disk) and what
reaches the application. A second MQTT client plays the edge: it reads every uplink the device sends and
publishes the downlinks (answers, configs, receipts). The re-send timers read a clock the test moves forward
(the mixins' modules get a ``time`` with an offset), so nothing waits for real seconds; every expectation is
counted by hand from the documented rules.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from broker import topics
from broker.address import BrokerAddress
from broker.chunking import Reassembler
from broker.wire import (
    ErrorReport,
    FeatureRecord,
    Kind,
    Prediction,
    decode_envelope,
    encode_envelope,
)
from device_sdk import DeviceClient
from device_sdk import receipts as receipts_module
from device_sdk import requests as requests_module
from tests.support.relay import TcpRelay

DEV = "d1"


class Clock:
    """``time.monotonic`` plus an offset the test moves forward (installed in the mixins' modules only)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    fake = SimpleNamespace(monotonic=c.monotonic)
    monkeypatch.setattr(requests_module, "time", fake)
    monkeypatch.setattr(receipts_module, "time", fake)
    return c


class Edge:
    """A plain MQTT client in the edge's place: records every uplink of the device, publishes its downlinks."""

    def __init__(self, addr: BrokerAddress, site: str) -> None:
        self.site = site
        self.got: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self._seq = 0
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"edge-{uuid.uuid4().hex[:8]}")
        self.client.on_message = self._on_message
        self.client.connect(addr.host, addr.port)
        self.client.loop_start()
        info = self.client.subscribe(f"megace/v1/site/{site}/device/{DEV}/up/#", qos=1)
        assert info[0] == mqtt.MQTT_ERR_SUCCESS
        time.sleep(0.2)  # the subscription is in place before the device sends

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.got.append((msg.topic, bytes(msg.payload)))

    def uplinks(self, what: topics.Uplink) -> list[tuple[str, bytes]]:
        """(topic, payload) of the device's ``what`` messages so far, chunks included, in arrival order."""
        base = topics.device_up(self.site, DEV, what)
        with self._lock:
            return [(t, p) for t, p in self.got if t == base or t.startswith(base + "/chunk/")]

    def send(self, what: topics.Downlink, kind: Kind, message: Any) -> None:
        self._seq += 1
        payload = encode_envelope(kind, "edge", self._seq, message.to_body())
        self.client.publish(topics.device_down(self.site, DEV, what), payload, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def until(predicate: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def record(sample: int, width: int = 4) -> FeatureRecord:
    return FeatureRecord(DEV, sample, {"env": np.full(width, sample, np.float32)}, label=0)


@pytest.fixture
def site() -> str:
    return f"s{uuid.uuid4().hex[:8]}"


@pytest.fixture
def edge(mosquitto_addr: BrokerAddress, site: str) -> Iterator[Edge]:
    e = Edge(mosquitto_addr, site)
    yield e
    e.close()


def _client(addr: BrokerAddress, site: str, tmp_path: Path, got: list[tuple[Kind, Any]] | None = None,
            **kw: Any) -> DeviceClient:
    handler = None if got is None else (lambda kind, message: got.append((kind, message)))
    return DeviceClient(site, DEV, addr, store_path=tmp_path / "q.sqlite", metrics_interval=0, on_downlink=handler,
                        reconnect_max_delay=0.2, **kw)


def _reassembled(base: str, parts: list[tuple[str, bytes]]) -> list[bytes]:
    """The whole payloads the chunks in ``parts`` complete, in order."""
    reassembler = Reassembler()
    wholes = (reassembler.feed(base, decode_envelope(p).body) for t, p in parts if t.startswith(base + "/chunk/"))
    return [w for w in wholes if w is not None]


def _settle(dev: DeviceClient) -> None:
    """Let the client apply what paho queued (acks, downlinks): the re-send check runs there."""
    assert dev.flush(10)


# ------------------------------------------------------------------ inference requests


def test_an_unanswered_request_goes_again_as_the_same_bytes_then_a_late_answer_reaches_the_app_once(
        mosquitto_addr: BrokerAddress, edge: Edge, site: str, tmp_path: Path, clock: Clock) -> None:
    got: list[tuple[Kind, Any]] = []
    dev = _client(mosquitto_addr, site, tmp_path, got, infer_retry_s=10.0, infer_max_tries=3)
    try:
        assert dev.connect(10)
        seq = dev.request_inference(record(7))
        until(lambda: len(edge.uplinks(topics.Uplink.INFER)) == 1, "the request")
        ((topic, first),) = edge.uplinks(topics.Uplink.INFER)
        env = decode_envelope(first)
        assert topic == f"megace/v1/site/{site}/device/{DEV}/up/infer"
        assert (env.kind, env.sender, env.seq) == (Kind.INFER, DEV, seq)
        request = FeatureRecord.from_body(env.body)
        assert request.sample == 7 and np.array_equal(request.modalities["env"], np.full(4, 7, np.float32))
        _settle(dev)
        clock.advance(5.0)  # half the interval: real seconds that pass under load cannot make it due
        _settle(dev)
        assert dev.counters["infer_resent"] == 0  # not due yet
        clock.advance(5.0)  # 10 s after the first publish
        until(lambda: len(edge.uplinks(topics.Uplink.INFER)) == 2, "the first re-send")
        clock.advance(20.0)  # then twice as long
        until(lambda: len(edge.uplinks(topics.Uplink.INFER)) == 3, "the second re-send")
        assert [p for _, p in edge.uplinks(topics.Uplink.INFER)] == [first] * 3  # same seq, same bytes
        clock.advance(40.0)  # three publishes were all it had: given up
        until(lambda: dev.counters["infer_given_up"] == 1, "the request to be given up")
        assert dev.counters["infer_resent"] == 2 and len(edge.uplinks(topics.Uplink.INFER)) == 3
        edge.send(topics.Downlink.PREDICTION, Kind.PREDICTION, Prediction(DEV, 7, 1, np.array([0.2, 0.8])))
        edge.send(topics.Downlink.PREDICTION, Kind.PREDICTION, Prediction(DEV, 7, 0, np.array([0.9, 0.1])))
        until(lambda: dev.counters["infer_duplicate_answers"] == 1, "the second answer to be dropped")
        assert [(k, m.sample, m.label) for k, m in got] == [(Kind.PREDICTION, 7, 1)]  # late, and once
        assert dev.metrics.snapshot()["rtt_ms"]["count"] == 1  # the answer closed the request's round trip
    finally:
        dev.close(5)


def test_answered_requests_are_not_sent_again(
        mosquitto_addr: BrokerAddress, edge: Edge, site: str, tmp_path: Path, clock: Clock) -> None:
    """A prediction answers by sample, an error by the request's seq; only the unanswered third goes again."""
    got: list[tuple[Kind, Any]] = []
    dev = _client(mosquitto_addr, site, tmp_path, got, infer_retry_s=10.0)
    try:
        assert dev.connect(10)
        by_prediction = dev.request_inference(record(1))
        by_error = dev.request_inference(record(2))
        # an edge answers what reached it: the requests followed the device's SUBSCRIBE on its connection, so
        # its downlinks are subscribed by then (answering at once lost both answers once in a loaded full run)
        until(lambda: len(edge.uplinks(topics.Uplink.INFER)) == 2, "both requests at the edge")
        edge.send(topics.Downlink.PREDICTION, Kind.PREDICTION, Prediction(DEV, 1, 1, np.array([0.2, 0.8])))
        edge.send(topics.Downlink.ERROR, Kind.ERROR, ErrorReport("busy", "queue full", ref=by_error))
        until(lambda: len(got) == 2, "both answers")
        unanswered = dev.request_inference(record(3))
        _settle(dev)
        clock.advance(10.0)
        until(lambda: len(edge.uplinks(topics.Uplink.INFER)) == 4, "the unanswered request again")
        seqs = [decode_envelope(p).seq for _, p in edge.uplinks(topics.Uplink.INFER)]
        assert seqs == [by_prediction, by_error, unanswered, unanswered]
        assert dev.counters["infer_resent"] == 1
    finally:
        dev.close(5)


def test_a_request_over_the_packet_limit_goes_again_as_chunks_of_the_same_envelope(
        mosquitto_addr: BrokerAddress, edge: Edge, site: str, tmp_path: Path, clock: Clock) -> None:
    limit = 1500
    dev = _client(mosquitto_addr, site, tmp_path, infer_retry_s=10.0, max_packet=limit, batch_bytes=1024)
    try:
        assert dev.connect(10)
        dev.request_inference(record(8))  # the big one's seq is 1, not the 0 a chunk's seq defaults to
        seq = dev.request_inference(record(9, width=2000))  # about 8 KB of features
        assert seq == 1
        base = topics.device_up(site, DEV, topics.Uplink.INFER)
        until(lambda: len(_reassembled(base, edge.uplinks(topics.Uplink.INFER))) == 1, "the whole request")
        _settle(dev)
        n = len(edge.uplinks(topics.Uplink.INFER)) - 1
        assert n >= 6  # in chunks of under 1.5 KB
        clock.advance(10.0)
        until(lambda: len(edge.uplinks(topics.Uplink.INFER)) == 2 + 2 * n, "both requests again")
        small = [p for t, p in edge.uplinks(topics.Uplink.INFER) if t == base]
        assert len(small) == 2 and small[0] == small[1]  # the small one whole, both times
        parts = [(t, p) for t, p in edge.uplinks(topics.Uplink.INFER) if t != base]
        assert [t for t, _ in parts] == [topics.chunk(base, i) for i in range(n)] * 2
        assert all(len(p) <= limit for _, p in parts)
        envs = [decode_envelope(p) for _, p in parts]
        assert {(e.kind, e.sender, e.seq) for e in envs} == {(Kind.CHUNK, DEV, seq)}
        wholes = _reassembled(base, parts)
        assert len(wholes) == 2 and wholes[0] == wholes[1]  # both transfers carry the very same request
        env = decode_envelope(wholes[0])
        assert (env.kind, env.sender, env.seq) == (Kind.INFER, DEV, seq)
        assert FeatureRecord.from_body(env.body).sample == 9
    finally:
        dev.close(5)


def test_a_resend_still_unacknowledged_is_not_sent_again(
        mosquitto_addr: BrokerAddress, edge: Edge, site: str, tmp_path: Path, clock: Clock) -> None:
    """The re-send is tracked in flight under the request's seq like the first publish: while the broker has not
    acknowledged it, the next re-send waits."""
    relay = TcpRelay(mosquitto_addr)
    dev = _client(relay.address, site, tmp_path, infer_retry_s=10.0)
    try:
        assert dev.connect(10)
        seq = dev.request_inference(record(6))
        _settle(dev)
        assert relay.hold(up=False, down=True) == 1  # from now on no acknowledgement reaches the device
        clock.advance(10.0)
        until(lambda: len(edge.uplinks(topics.Uplink.INFER)) == 2, "the re-send")
        clock.advance(20.0)  # the next re-send would be due now, but the last one is still in flight
        assert dev.pending == 1
        assert dev.counters["infer_resent"] == 1 and len(edge.uplinks(topics.Uplink.INFER)) == 2
        assert {decode_envelope(p).seq for _, p in edge.uplinks(topics.Uplink.INFER)} == {seq}
    finally:
        relay.close()
        dev.close(0.5)


def test_a_request_still_on_disk_or_unacknowledged_is_not_sent_again(
        mosquitto_addr: BrokerAddress, edge: Edge, site: str, tmp_path: Path, clock: Clock) -> None:
    """The SDK's ordinary delivery owns a request until the broker acknowledges it: the re-send timer starts then."""
    relay = TcpRelay(mosquitto_addr)
    got: list[tuple[Kind, Any]] = []
    dev = _client(relay.address, site, tmp_path, got, infer_retry_s=10.0)
    try:
        queued = dev.request_inference(record(4))  # not connected yet: it waits on disk
        assert len(dev.store) == 1
        clock.advance(30.0)  # long overdue by the time the link comes up
        assert dev.connect(10)
        until(lambda: len(edge.uplinks(topics.Uplink.INFER)) == 1, "the queued request")
        _settle(dev)
        assert dev.counters["infer_resent"] == 0  # the drain sent it; the re-send timer starts at its ack
        edge.send(topics.Downlink.PREDICTION, Kind.PREDICTION, Prediction(DEV, 4, 1, np.array([0.2, 0.8])))
        until(lambda: len(got) == 1, "its answer")
        assert relay.hold(up=False, down=True) == 1  # the broker's acknowledgements stop reaching the device
        unacked = dev.request_inference(record(5))
        until(lambda: len(edge.uplinks(topics.Uplink.INFER)) == 2, "the second request")
        clock.advance(30.0)
        assert dev.pending == 1  # applies queued events and runs the re-send check: still in flight
        assert dev.counters["infer_resent"] == 0 and len(edge.uplinks(topics.Uplink.INFER)) == 2
        assert [decode_envelope(p).seq for _, p in edge.uplinks(topics.Uplink.INFER)] == [queued, unacked]
    finally:
        relay.close()
        dev.close(0.5)

