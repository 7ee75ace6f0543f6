"""A real MQTT subscriber for tests: collects decoded envelopes from a broker."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import paho.mqtt.client as mqtt

from broker.address import BrokerAddress
from broker.errors import WireError
from broker.inbox import Inbox
from broker.wire import Envelope


class Collector:
    """Subscribes to topic filters (chunk topics included) and keeps every decoded envelope in order."""

    def __init__(self, addr: BrokerAddress, *filters: str, client_id: str | None = None,
                 clean_session: bool = True) -> None:
        self.addr = addr
        self.filters = filters
        self.envelopes: list[tuple[str, Envelope]] = []
        self.raw: list[tuple[str, bytes, bool]] = []
        self.errors: list[WireError] = []
        self._inbox = Inbox()
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        ident = client_id or f"col-{uuid.uuid4().hex[:8]}"
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=ident, protocol=mqtt.MQTTv311,
                                  clean_session=clean_session)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.reconnect_delay_set(0.05, 0.5)

    def _on_connect(self, client: mqtt.Client, *_: Any) -> None:
        client.subscribe([(f, 1) for f in self.filters])

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.raw.append((msg.topic, msg.payload, bool(msg.retain)))
            try:
                got = self._inbox.accept(msg.topic, msg.payload)
                if got is not None:
                    self.envelopes.append((got[0].base, got[1]))
            except WireError as exc:
                self.errors.append(exc)
            self._cond.notify_all()

    def start(self) -> Collector:
        self.client.connect(self.addr.host, self.addr.port)
        self.client.loop_start()
        assert self._subscribed.wait(10), "collector never subscribed"
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def wait_for(self, n: int, timeout: float = 20.0) -> list[tuple[str, Envelope]]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.envelopes) < n and time.monotonic() < deadline:
                self._cond.wait(0.1)
            return list(self.envelopes)

    def __enter__(self) -> Collector:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
