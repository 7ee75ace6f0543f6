"""Every row of :mod:`broker.capabilities`, probed on the real broker it describes (all started by the tests).

A row that stops being true (a broker upgrade that delivers retained messages through wildcards, a
``$share`` that starts splitting) fails here, so the table megace's design leans on stays measured.
Absence is shown without sleeping: each subscriber also gets a later live message on the same path
through the same broker, and brokers deliver a subscription's retained message before later live ones.
"""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from broker import topics
from broker.address import BrokerAddress
from broker.capabilities import MATRIX, BrokerCapabilities, capabilities
from broker.inbox import Inbox
from broker.wire import FeatureRecord, Kind, encode_envelope
from broker.wire.bodies import decode_body

WAIT_S = 30.0  # generous: the box is shared


@pytest.fixture(params=sorted(MATRIX))
def broker(request: pytest.FixtureRequest) -> tuple[BrokerCapabilities, BrokerAddress]:
    """(what the table says, where the real broker listens) for each broker of the matrix."""
    return capabilities(request.param), request.getfixturevalue(f"{request.param}_addr")


class Sub:
    """A paho subscriber (MQTT 3.1.1, QoS 1) that records ``(topic, payload, retain)`` in arrival order."""

    def __init__(self, addr: BrokerAddress, *filters: str) -> None:
        self.got: list[tuple[str, bytes, bool]] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"mx-{uuid.uuid4().hex[:10]}",
                             protocol=mqtt.MQTTv311)
        self.c.on_connect = lambda c, *_: c.subscribe([(f, 1) for f in filters])
        self.c.on_subscribe = lambda *_: self._subscribed.set()
        self.c.on_message = self._on_message
        self.c.connect(addr.host, addr.port)
        self.c.loop_start()
        assert self._subscribed.wait(WAIT_S), f"no SUBACK for {filters}"

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.got.append((msg.topic, bytes(msg.payload), bool(msg.retain)))
            self._cond.notify_all()

    def wait_for(self, cond: Callable[[list[tuple[str, bytes, bool]]], bool], what: str) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: cond(self.got), WAIT_S), f"timed out waiting for {what}: {self.got}"

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def _publish(addr: BrokerAddress, *msgs: tuple[str, bytes, bool]) -> None:
    """Publish ``(topic, payload, retain)`` in order at QoS 1 and wait for every PUBACK."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"mx-pub-{uuid.uuid4().hex[:10]}",
                    protocol=mqtt.MQTTv311)
    c.connect(addr.host, addr.port)
    c.loop_start()
    try:
        for topic, payload, retain in msgs:
            c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(WAIT_S)
    finally:
        c.disconnect()
        c.loop_stop()


def _v5_accepted(addr: BrokerAddress) -> bool:
    """Whether a bare MQTT 5 CONNECT gets CONNACK with reason 0 (hand-written: no client library's fallback)."""
    cid = f"mx-v5-{uuid.uuid4().hex[:8]}".encode()
    body = b"\x00\x04MQTT\x05\x02\x00\x0a\x00" + len(cid).to_bytes(2, "big") + cid  # v5, clean, 10 s, no props
    with socket.create_connection((addr.host, addr.port), timeout=WAIT_S) as s:
        s.settimeout(WAIT_S)
        s.sendall(bytes([0x10, len(body)]) + body)
        got = b""
        try:
            while len(got) < 4:
                part = s.recv(4 - len(got))
                if not part:
                    return False  # closed during CONNECT: a strict 3.1.1 broker
                got += part
        except ConnectionResetError:
            return False
    return got[0] == 0x20 and got[3] == 0


def test_the_matrix_covers_every_broker_the_bus_tests_run_on() -> None:
    from tests.conftest import BROKER_MATRIX

    assert sorted(BROKER_MATRIX) == sorted(MATRIX)
    with pytest.raises(KeyError, match="not in the matrix"):
        capabilities("emqx")


def test_retained_reaches_exact_filters_always_and_wildcards_only_where_the_table_says(broker) -> None:
    caps, addr = broker
    base = f"{topics.ROOT}/matrix/{uuid.uuid4().hex[:12]}"
    retained_topic = f"{base}/r"
    _publish(addr, (retained_topic, b"kept", True))
    exact, wild = Sub(addr, retained_topic), Sub(addr, f"{base}/+")
    try:
        exact.wait_for(lambda g: (retained_topic, b"kept", True) in g, "the retained message on an exact filter")
        _publish(addr, (retained_topic, b"live", False))  # a fence: it follows any retained delivery
        wild.wait_for(lambda g: any(p == b"live" for _, p, _ in g), "a live message through the wildcard")
        got_retained = any(p == b"kept" for _, p, _ in wild.got)
        assert got_retained is caps.retained_via_wildcard, (caps.name, wild.got)
    finally:
        exact.close()
        wild.close()
        _publish(addr, (retained_topic, b"", True))  # clear it


def test_shared_subscriptions_split_only_where_the_table_says(broker) -> None:
    caps, addr = broker
    base = f"{topics.ROOT}/matrix/{uuid.uuid4().hex[:12]}"
    work, fence = f"{base}/work", f"{base}/fence"
    members = [Sub(addr, f"$share/g/{work}", fence) for _ in range(2)]
    try:
        n = 20
        _publish(addr, *[(work, str(i).encode(), False) for i in range(n)], (fence, b"end", False))
        for m in members:
            m.wait_for(lambda g: any(t == fence for t, _, _ in g), "the fence after the shared messages")
        shared = [[p for t, p, _ in m.got if t == work] for m in members]
        if caps.shared_subscriptions:
            assert sorted(int(p) for p in shared[0] + shared[1]) == list(range(n))  # each message once
            assert shared[0] and shared[1], shared  # split between the members, not all to one
        else:
            assert shared == [[], []], (caps.name, shared)  # acknowledged, never delivered
    finally:
        for m in members:
            m.close()


def test_mqtt5_is_accepted_only_where_the_table_says(broker) -> None:
    caps, addr = broker
    assert _v5_accepted(addr) is caps.mqtt5


def test_ids_with_dash_and_underscore_round_trip_on_every_broker(broker) -> None:
    """The portable id charset: '-' and '_' survive every broker (a '.' would not; topics refuse it)."""
    _, addr = broker
    site, device = f"site_{uuid.uuid4().hex[:6]}-a", "gw-7_b"
    topic = topics.device_up(site, device, topics.Uplink.FEATURES)
    rec = FeatureRecord(device, 4, {"accel": np.arange(30, dtype=np.float32).reshape(10, 3)}, label=1)
    sub = Sub(addr, topics.site_device_uplinks(site))
    try:
        _publish(addr, (topic, encode_envelope(Kind.FEATURES, device, 1, rec.to_body()), False))
        sub.wait_for(lambda g: bool(g), "the record")
        got_topic, payload, _ = sub.got[0]
        assert got_topic == topic
        parsed, env = Inbox().accept(got_topic, payload)  # type: ignore[misc]
        assert (parsed.site, parsed.device, env.sender) == (site, device, device)
        assert np.array_equal(decode_body(env).modalities["accel"], rec.modalities["accel"])
    finally:
        sub.close()


def test_the_rabbitmq_runner_uses_only_its_own_loopback_ports_and_restarts_on_its_data() -> None:
    """Its own node (ports, epmd, cookie, data dir), never the machine's: nothing on a default port. A stop and
    a start keep what the broker stored (a retained message); after a SIGKILL it starts again on the same ports.
    (Measured: RabbitMQ 3.10 keeps retained messages in DETS and loses those of the last minutes to a SIGKILL.)"""
    from broker.runners import RabbitMQBroker
    from broker.runners.ports import wait_for_port

    with RabbitMQBroker() as b:
        ports = {b.port, b.amqp_port, b.dist_port, b.epmd_port}
        assert len(ports) == 4 and not ports & {1883, 5672, 4369, 25672, 15672, 8883}
        for p in ports:
            wait_for_port("127.0.0.1", p, timeout_s=60)  # AMQP and distribution may open after MQTT, under load
        assert (b.state_dir / ".erlang.cookie").stat().st_mode & 0o077 == 0
        addr = BrokerAddress(b.host, b.port)
        topic = f"{topics.ROOT}/matrix/{uuid.uuid4().hex[:8]}/kept"
        _publish(addr, (topic, b"across a restart", True))
        b.stop()
        b.start()
        sub = Sub(addr, topic)
        try:
            sub.wait_for(lambda g: (topic, b"across a restart", True) in g, "the retained message after restart")
        finally:
            sub.close()
        b.stop(kill=True)
        assert not b.running
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", b.port), timeout=1).close()
        b.start()  # the same node name on the same epmd and ports: a crash leaves nothing in the way
        _publish(addr, (topic, b"", True))
