"""What the dashboard tests share: the shrunken loop's shape, a raw recorder of the dashboard topics, the run
(``conftest.fleet`` runs it once per session)."""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from broker import topics
from broker.address import BrokerAddress
from megace.dashboard.brokers import WebSocketMosquitto
from megace.loop.results import LoopResult

ROUNDS = 2
EDGES = 2
DEVICES_PER_EDGE = 2
ARTIFACTS = Path(__file__).resolve().parents[2] / "reports" / "dashboard"
"""Where the browser test writes its screenshot (the README shows it)."""

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def site(edge: int) -> str:
    return f"site-{edge}"


def device(edge: int, d: int) -> str:
    return f"e{edge}-dev{d}"


class Recorder:
    """A plain paho subscriber that keeps every (topic, payload, retained) of the dashboard topics."""

    FILTERS = (topics.all_status(), topics.all_metrics(), topics.all_events())

    def __init__(self, addr: BrokerAddress) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"rec-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv311)
        self.client.on_connect = lambda c, *_: c.subscribe([(f, 1) for f in self.FILTERS])
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(addr.host, addr.port)
        self.client.loop_start()
        assert self._subscribed.wait(10), "recorder never subscribed"

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def snapshot(self) -> list[tuple[str, bytes, bool]]:
        with self._lock:
            return list(self.messages)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class Fleet:
    broker: WebSocketMosquitto
    addr: BrokerAddress
    result: LoopResult
    live: list[tuple[str, bytes, bool]]
    page: Any = None  # the Playwright page that watched the run
    page_url: str = ""
    page_errors: list[str] = field(default_factory=list)  # uncaught exceptions in the page's scripts


