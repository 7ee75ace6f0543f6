"""The test runner's Mosquitto really persists: a database file, and retained + queued QoS 1 messages
for an offline persistent session that come back after a restart.

As root, Mosquitto used to drop to user ``mosquitto``, could not write its 0700 temp state dir and
silently persisted nothing, so restart tests passed without exercising persistence at all.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from broker.runners import MosquittoBroker

QUEUED = "megace/v1/reliability/persist/queued"
RETAINED = "megace/v1/reliability/persist/retained"


class Client:
    """A blocking paho client: connect, subscribe, publish at QoS 1, collect what arrives."""

    def __init__(self, port: int, client_id: str, *, clean_session: bool) -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self.session_present: bool | None = None
        self._cond = threading.Condition()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                             clean_session=clean_session)
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        assert self.wait(lambda: self.session_present is not None), "never connected"

    def _on_connect(self, _c: mqtt.Client, _u: Any, flags: Any, _r: Any, _p: Any) -> None:
        with self._cond:
            self.session_present = bool(flags.session_present)
            self._cond.notify_all()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(msg)
            self._cond.notify_all()

    def wait(self, pred: Any, timeout: float = 10.0) -> bool:
        with self._cond:
            return self._cond.wait_for(pred, timeout)

    def subscribe(self, topic: str) -> None:
        done = threading.Event()
        self.c.on_subscribe = lambda *a: done.set()
        self.c.subscribe(topic, qos=1)
        assert done.wait(10), "no SUBACK"

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        info = self.c.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(10)
        assert info.is_published(), "no PUBACK"

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def broker() -> Iterator[MosquittoBroker]:
    # saves after every change, as deploy/mosquitto/durability.conf does
    b = MosquittoBroker(persistence=True, autosave_interval=1, autosave_on_changes=True).start()
    try:
        yield b
    finally:
        b.close()


def _leave_messages(broker: MosquittoBroker, sub_id: str) -> None:
    """A persistent subscriber goes offline; a retained and a QoS 1 message are acknowledged meanwhile."""
    sub = Client(broker.port, sub_id, clean_session=False)
    sub.subscribe(QUEUED)
    sub.close()
    pub = Client(broker.port, f"pub-{uuid.uuid4().hex[:8]}", clean_session=True)
    pub.publish(RETAINED, b"retained-1", retain=True)
    pub.publish(QUEUED, b"queued-1")
    pub.close()


def _assert_messages_back(broker: MosquittoBroker, sub_id: str) -> None:
    sub = Client(broker.port, sub_id, clean_session=False)  # no new SUBSCRIBE: the session must carry it
    try:
        assert sub.session_present, "the broker forgot the persistent session"
        assert sub.wait(lambda: any(m.topic == QUEUED for m in sub.messages)), "queued QoS 1 message lost"
        assert [m.payload for m in sub.messages if m.topic == QUEUED] == [b"queued-1"]
    finally:
        sub.close()
    late = Client(broker.port, f"late-{uuid.uuid4().hex[:8]}", clean_session=True)
    try:
        late.subscribe(RETAINED)
        assert late.wait(lambda: bool(late.messages)), "retained message lost"
        assert late.messages[0].payload == b"retained-1" and late.messages[0].retain
    finally:
        late.close()


def test_config_keeps_the_broker_able_to_write_its_state_dir(broker: MosquittoBroker) -> None:
    assert broker.running
    assert "user " in broker.config_path.read_text()
    broker.stop()  # SIGTERM: Mosquitto saves on the way out
    assert broker.db_path.exists() and broker.db_path.stat().st_size > 0, list(broker.state_dir.iterdir())


def test_retained_and_queued_qos1_survive_a_sigterm_restart(broker: MosquittoBroker) -> None:
    sub_id = f"persist-{uuid.uuid4().hex[:8]}"
    _leave_messages(broker, sub_id)
    broker.stop()
    assert broker.db_path.exists()
    broker.start()  # same port, same state dir
    _assert_messages_back(broker, sub_id)


def test_retained_and_queued_qos1_survive_a_sigkill_once_saved(broker: MosquittoBroker) -> None:
    """With a save after every change, the database holds both messages right after their PUBACKs
    (the event-loop pass that sent the PUBACK ends with the save); a kill -9 then loses nothing."""
    sub_id = f"persist-{uuid.uuid4().hex[:8]}"
    _leave_messages(broker, sub_id)
    time.sleep(0.3)  # past the save that ends the pass (the window a kill -9 could still hit)
    assert broker.db_path.exists()
    broker.stop(kill=True)
    broker.start()
    _assert_messages_back(broker, sub_id)
