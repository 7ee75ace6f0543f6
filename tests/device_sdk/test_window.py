"""The SDK's own in-flight window (device_sdk/window.py) on a real paho client and a real Mosquitto.

The publishing client runs no network thread: a test calls ``loop()`` itself, so PUBACKs reach the window
exactly when the test lets them (paho writes a publish at once when no loop thread runs). A second client
subscribes and records what the broker delivered, in order.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from broker.address import BrokerAddress
from device_sdk.window import Item, Window

SIZE = 3


def _until(predicate: Callable[[], bool], step: Callable[[], Any] = lambda: time.sleep(0.01),
           timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        step()


class Rig:
    """A connected publisher (no loop thread) whose acks feed ``window``, and a subscriber on ``topic``."""

    def __init__(self, addr: BrokerAddress) -> None:
        self.topic = f"megace/v1/test/window/{uuid.uuid4().hex[:8]}"
        self.events: deque[tuple[str, Any]] = deque()
        self.window = Window(SIZE, self.events)
        self.most_on_wire = 0
        self.got: list[bytes] = []
        self._got_lock = threading.Lock()
        subscribed = threading.Event()
        self.sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"win-sub-{uuid.uuid4().hex[:6]}")
        self.sub.on_connect = lambda c, *_: c.subscribe(self.topic, qos=1)
        self.sub.on_subscribe = lambda *_: subscribed.set()
        self.sub.on_message = self._on_message
        self.sub.connect(addr.host, addr.port)
        self.sub.loop_start()
        assert subscribed.wait(10)
        self.pub = self.client(addr)

    def client(self, addr: BrokerAddress, max_queued: int = 0) -> mqtt.Client:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"win-pub-{uuid.uuid4().hex[:6]}")
        c.max_inflight_messages_set(0)  # as the SDK does: the window is the Window's
        c.max_queued_messages_set(max_queued)  # paho refuses to change it once connected
        c.on_publish = lambda client, _u, mid, *_: self._acked(client, mid)
        c.connect(addr.host, addr.port)
        _until(c.is_connected, lambda: c.loop(0.05))
        return c

    def _acked(self, client: mqtt.Client, mid: int) -> None:
        self.window.acked(client, mid)

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._got_lock:
            self.got.append(msg.payload)

    def received(self) -> list[bytes]:
        with self._got_lock:
            return list(self.got)

    def step(self) -> None:
        self.pub.loop(0.02)
        self.most_on_wire = max(self.most_on_wire, self.window.on_wire)

    def close(self) -> None:
        self.pub.disconnect()
        self.sub.loop_stop()
        self.sub.disconnect()


@pytest.fixture
def rig(mosquitto_addr: BrokerAddress) -> Iterator[Rig]:
    r = Rig(mosquitto_addr)
    r.window.reset(r.pub)
    try:
        yield r
    finally:
        r.close()


def _item(i: int, topic: str) -> tuple[Item, bytes]:
    payload = f"record-{i}".encode()
    return (i, topic, payload, None), payload


def _apply_sent(events: deque[tuple[str, Any]], inflight: dict[int, Item]) -> None:
    """What the client does with the window's ``sent`` events: the placeholder key becomes the mid."""
    while events:
        kind, pairs = events.popleft()
        assert kind == "sent"
        for key, mid in pairs:
            inflight[mid] = inflight.pop(key)


def _arrive_in_order(rig: Rig, items: list[tuple[Item, bytes]]) -> None:
    """Every payload reaches the subscriber, in the order it was submitted."""
    _until(lambda: len(rig.received()) == len(items), rig.step)
    assert rig.received() == [p for _, p in items]


def _submitted(rig: Rig, n: int) -> tuple[dict[int, Item], list[tuple[Item, bytes]]]:
    """``SIZE + 2`` records, the first ``n`` of them submitted (a full window: the rest wait)."""
    inflight: dict[int, Item] = {}
    items = [_item(i, rig.topic) for i in range(SIZE + 2)]
    for item, payload in items[:n]:
        rig.window.submit(rig.pub, rig.topic, payload, item, inflight)
    return inflight, items


def _hold_every_ack(rig: Rig) -> None:
    """The caller side holds the lock while every PUBACK comes: paho's thread can only queue them."""
    with rig.window.lock:
        _until(lambda: len(rig.window.freed) == SIZE, rig.step)


def test_at_most_size_messages_are_on_the_wire_and_all_arrive_in_order(rig: Rig) -> None:
    inflight: dict[int, Item] = {}
    items = [_item(i, rig.topic) for i in range(SIZE + 4)]
    for item, payload in items:
        rig.window.submit(rig.pub, rig.topic, payload, item, inflight)
    # a full window: exactly SIZE published, the rest waiting under negative placeholder keys, in order
    assert rig.window.on_wire == SIZE and len(rig.window.ready) == 4
    assert sorted(v[0] for k, v in inflight.items() if k > 0) == list(range(SIZE))
    assert [inflight[k][0] for k, _, _ in rig.window.ready] == list(range(SIZE, SIZE + 4))
    assert all(k < 0 for k, _, _ in rig.window.ready)
    # each PUBACK frees a slot that the next waiting message takes, from the (here: the test's) network loop
    _until(lambda: not rig.window.ready and rig.window.on_wire == 0, rig.step)
    _apply_sent(rig.events, inflight)
    assert rig.most_on_wire == SIZE  # the window filled again after acks, never beyond
    assert sorted(v[0] for v in inflight.values()) == list(range(SIZE + 4)) and all(k > 0 for k in inflight)
    _until(lambda: len(rig.received()) == len(items))
    assert rig.received() == [p for _, p in items]


def test_acks_that_found_the_lock_held_are_applied_by_the_next_submit(rig: Rig) -> None:
    inflight, items = _submitted(rig, SIZE + 1)
    with rig.window.lock:  # the caller side holds it: paho's thread only queues the acks
        _until(lambda: len(rig.window.freed) == SIZE, rig.step)
        assert rig.window.on_wire == SIZE and len(rig.window.ready) == 1
    # the next submit applies the freed slots and publishes the waiting message first, then its own
    item, payload = items[-1]
    rig.window.submit(rig.pub, rig.topic, payload, item, inflight)
    assert not rig.window.freed and not rig.window.ready and rig.window.on_wire == 2
    assert all(k > 0 for k in inflight) and sorted(v[0] for v in inflight.values()) == list(range(SIZE + 2))
    _arrive_in_order(rig, items)


def test_acks_that_found_the_lock_held_are_applied_by_the_next_ack_that_gets_it(rig: Rig) -> None:
    inflight, items = _submitted(rig, SIZE + 2)
    _hold_every_ack(rig)
    # no submit, no pump: the next PUBACK paho delivers (here one for a message that is not a record) frees them
    rig.window.acked(rig.pub, 65535)
    assert not rig.window.freed and not rig.window.ready and rig.window.on_wire == 2
    _apply_sent(rig.events, inflight)
    assert all(k > 0 for k in inflight)
    _arrive_in_order(rig, items)


def test_one_slot_freed_behind_a_waiting_message_is_filled_by_the_next_submit(rig: Rig) -> None:
    inflight, items = _submitted(rig, SIZE + 1)
    first = min(k for k in inflight if k > 0)
    with rig.window.lock:  # one PUBACK arrives while the caller holds the lock: queued (no network loop runs)
        rig.window.acked(rig.pub, first)
    assert rig.window.on_wire == SIZE and len(rig.window.ready) == 1
    item, payload = items[-1]
    rig.window.submit(rig.pub, rig.topic, payload, item, inflight)
    # the freed slot goes to the message that waited longest; the new one waits behind it
    assert rig.window.on_wire == SIZE and len(rig.window.ready) == 1
    assert inflight[rig.window.ready[0][0]][0] == SIZE + 1
    _arrive_in_order(rig, items)


def test_pump_applies_held_acks_and_fills_the_free_slots(rig: Rig) -> None:
    inflight, _ = _submitted(rig, SIZE + 2)
    _hold_every_ack(rig)
    rig.window.pump(inflight)
    assert not rig.window.freed and not rig.window.ready and rig.window.on_wire == 2
    assert all(k > 0 for k in inflight) and sorted(v[0] for v in inflight.values()) == list(range(SIZE + 2))
    rig.window.pump(inflight)  # nothing freed, nothing waiting: no change
    assert rig.window.on_wire == 2 and len(inflight) == SIZE + 2


def test_a_message_for_another_connection_waits_and_an_old_connections_ack_frees_nothing(
    rig: Rig, mosquitto_addr: BrokerAddress
) -> None:
    inflight: dict[int, Item] = {}
    other = rig.client(mosquitto_addr)
    try:
        item, payload = _item(0, rig.topic)
        rig.window.submit(other, rig.topic, payload, item, inflight)  # not the window's connection
        assert rig.window.on_wire == 0 and len(rig.window.ready) == 1 and list(inflight) == [-1]
        for _ in range(20):
            other.loop(0.01)
        assert rig.received() == []
        # an ack on a connection the window no longer serves frees no slot of the new one
        rig.window.reset(other)
        first, p0 = _item(1, rig.topic)
        rig.window.submit(other, rig.topic, p0, first, inflight)
        assert rig.window.on_wire == 1
        rig.window.acked(rig.pub, next(k for k in inflight if k > 0))
        assert rig.window.on_wire == 1
    finally:
        other.disconnect()


def test_a_publish_paho_refuses_is_a_connection_error_that_says_why(rig: Rig, mosquitto_addr: BrokerAddress) -> None:
    full = rig.client(mosquitto_addr, max_queued=1)  # its unacknowledged message fills paho's queue
    try:
        rig.window.reset(full)
        inflight: dict[int, Item] = {}
        first, p0 = _item(0, rig.topic)
        rig.window.submit(full, rig.topic, p0, first, inflight)
        second, p1 = _item(1, rig.topic)
        with pytest.raises(ConnectionError) as err:
            rig.window.submit(full, rig.topic, p1, second, inflight)
        assert str(err.value) == f"paho refused to publish: {mqtt.error_string(mqtt.MQTT_ERR_QUEUE_SIZE)}"
        assert rig.window.on_wire == 1  # the refused one took no slot
    finally:
        full.disconnect()
