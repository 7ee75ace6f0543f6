"""The operator's view of the bus: status, JSON metrics, and a tap that timestamps inference traffic.

The tap subscribes, like any dashboard could, to the sites' device uplinks and downlinks. It notes when an
inference request reaches subscribers of the broker (about when the edge gets it) and when the answer does.
The tap runs in the loop's process and stamps with :func:`time.monotonic`, the clock the simulated devices
stamp their send and receive times with, so with those two stamps a round trip splits into uplink, edge time
and downlink on one clock, without touching the edge (see :meth:`LatencySample.from_stamps`).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt

from broker import topics
from broker.address import BrokerAddress
from broker.errors import WireError
from broker.inbox import Inbox
from broker.protocol import paho_clean_options
from broker.signing import is_signed, unsigned
from broker.wire import AdapterUpdate, Kind, Status, decode_metrics
from broker.wire.status import ONLINE


@dataclass(slots=True)
class Tap:
    """Per inference request (device, sample): when the tap saw the request and the answer (``time.monotonic``)."""

    request_seen: float | None = None
    answer_seen: float | None = None


@dataclass(slots=True)
class Upload:
    """One adapter upload as it crossed the bus: how many numbers it carried and how many bytes that took."""

    edge: str
    base_version: int
    params: int
    tensor_bytes: int
    payload_bytes: int


@dataclass
class BusView:
    """Everything the monitor learned so far (read under :attr:`Monitor.lock`)."""

    status: dict[tuple[str, str], Status] = field(default_factory=dict)
    edge_metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # latest per edge id
    cloud_metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    edge_history: list[tuple[float, str, dict[str, Any]]] = field(default_factory=list)
    cloud_history: list[tuple[float, str, dict[str, Any]]] = field(default_factory=list)
    taps: dict[tuple[str, int], Tap] = field(default_factory=dict)
    uploads: list[Upload] = field(default_factory=list)
    down_bytes: dict[str, int] = field(default_factory=dict)  # "global" and per site: cloud -> edge bytes
    wire_errors: int = 0
    signed: dict[str, list[int]] = field(default_factory=dict)  # channel -> [signed, all] whole messages seen

    def signed_share(self, channel: topics.Channel) -> tuple[int, int]:
        """(signed, all) of the whole messages (chunks reassembled) the monitor read on ``channel``."""
        got = self.signed.get(channel.value, [0, 0])
        return got[0], got[1]

    def up_bytes(self, edge: str) -> int:
        return sum(u.payload_bytes for u in self.uploads if u.edge == edge)

    def cloud_to(self, site: str) -> int:
        """Bytes the cloud sent that reach a site: the broadcast global plus the site's own feedback."""
        return self.down_bytes.get("global", 0) + self.down_bytes.get(site, 0)


class Monitor:
    """A paho subscriber in its own network thread; :meth:`wait_until` blocks on conditions over the view."""

    def __init__(self, address: BrokerAddress, devices: Iterable[tuple[str, str]] = (), *, tap: bool = True) -> None:
        self.address = address
        self.devices = list(devices)  # (site, device) pairs whose inference traffic the tap times
        self.view = BusView()
        self.lock = threading.Condition()
        self._inbox = Inbox(opener=self._open)
        self._subscribed = threading.Event()
        self._tap = tap
        self._adapter_bytes: dict[str, int] = {}  # per site: bytes of the upload being reassembled
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"megace-monitor-{uuid.uuid4().hex[:8]}",
                                  **paho_clean_options(address.protocol))
        if address.username:
            self.client.username_pw_set(address.username, address.password)
        if address.tls:
            self.client.tls_set_context(address.ssl_context())
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.reconnect_delay_set(0.05, 1.0)

    def filters(self) -> list[str]:
        out = [topics.all_status(), topics.all_metrics()]
        if self._tap:
            out.extend(topics.subscriptions(topics.all_adapter_uplinks()))
            out.extend(topics.subscriptions(topics.global_down()))
            for site in sorted({s for s, _ in self.devices}):
                out.extend(topics.subscriptions(topics.site_feedback(site)))
            for site in sorted({s for s, _ in self.devices}):
                out.append(topics.site_device_uplinks(site))
            out.extend(topics.device_downlinks(site, dev) for site, dev in self.devices)
        return out

    def start(self, timeout: float = 20.0) -> Monitor:
        self.client.connect(self.address.host, self.address.port, keepalive=self.address.keepalive)
        self.client.loop_start()
        if not self._subscribed.wait(timeout):
            raise TimeoutError(f"monitor could not subscribe on {self.address}")
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def wait_until(self, predicate: Any, timeout: float, poll: float = 0.2) -> bool:
        """Block until ``predicate(view)`` is true (checked on every message and every ``poll`` s)."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while not predicate(self.view):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.lock.wait(min(left, poll))
            return True

    def online(self, role: topics.Role, ident: str) -> bool:
        with self.lock:
            st = self.view.status.get((role.value, ident))
            return st is not None and st.state == ONLINE

    # -- paho thread -------------------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, *_: Any) -> None:
        client.subscribe([(f, 1) for f in self.filters()])

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.monotonic()  # the devices' clock: latency legs are differences on this one clock
        try:
            parsed = topics.parse(msg.topic)
            if parsed.channel is topics.Channel.METRICS:
                doc = decode_metrics(msg.payload)
                self._metrics(parsed, doc, now)
            elif parsed.channel is topics.Channel.STATUS:
                st = Status.decode(msg.payload)
                with self.lock:
                    self.view.status[(st.role, st.id)] = st
                    self.lock.notify_all()
            elif parsed.channel in (topics.Channel.GLOBAL_DOWN, topics.Channel.SITE_FEEDBACK):
                key = "global" if parsed.channel is topics.Channel.GLOBAL_DOWN else (parsed.site or "")
                with self.lock:
                    self.view.down_bytes[key] = self.view.down_bytes.get(key, 0) + len(msg.payload)
            elif parsed.channel is topics.Channel.ADAPTER_UP:
                self._adapter(parsed.site or "", msg.topic, msg.payload)
            elif parsed.what in (topics.Uplink.INFER.value, topics.Downlink.PREDICTION.value):
                self._tap_message(msg.topic, msg.payload, now)
        except WireError:
            with self.lock:
                self.view.wire_errors += 1

    def _open(self, parsed: topics.Parsed, payload: bytes) -> bytes:
        """Note whether a whole message (uploads, inference traffic) came signed; read it without verifying
        (the monitor is a tap: the receivers verify)."""
        with self.lock:
            counts = self.view.signed.setdefault(parsed.channel.value, [0, 0])
            counts[0] += int(is_signed(payload))
            counts[1] += 1
        return unsigned(payload)

    def _metrics(self, parsed: topics.Parsed, doc: dict[str, Any], now: float) -> None:
        ident = parsed.ident or ""
        values = dict(doc["metrics"])
        with self.lock:
            if parsed.role is topics.Role.EDGE:
                self.view.edge_metrics[ident] = values
                self.view.edge_history.append((now, ident, values))
            elif parsed.role is topics.Role.CLOUD:
                self.view.cloud_metrics[ident] = values
                self.view.cloud_history.append((now, ident, values))
            self.lock.notify_all()

    def _adapter(self, site: str, topic: str, payload: bytes) -> None:
        self._adapter_bytes[site] = self._adapter_bytes.get(site, 0) + len(payload)
        got = self._inbox.accept(topic, payload)
        if got is None:
            return
        total = self._adapter_bytes.pop(site, 0)
        update = AdapterUpdate.from_body(got[1].body)
        params = sum(int(a.size) for a in update.tensors.values())
        nbytes = sum(int(a.nbytes) for a in update.tensors.values())
        with self.lock:
            self.view.uploads.append(Upload(update.edge, update.base_version, params, nbytes, total))
            self.lock.notify_all()

    def _tap_message(self, topic: str, payload: bytes, now: float) -> None:
        got = self._inbox.accept(topic, payload)
        if got is None:
            return
        _, env = got
        body = env.body if isinstance(env.body, dict) else {}
        key = (str(body.get("device", "")), int(body.get("sample", -1)))
        with self.lock:
            tap = self.view.taps.setdefault(key, Tap())
            if env.kind is Kind.INFER:
                tap.request_seen = now
            elif env.kind is Kind.PREDICTION:
                tap.answer_seen = now

