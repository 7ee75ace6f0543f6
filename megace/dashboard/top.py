"""``megace top``: the fleet in a terminal (over SSH, no browser), from the same JSON topics as the web page.

A read-only MQTT subscriber (paho, its own thread) feeds :class:`megace.dashboard.model.Fleet`; rich draws
it: the cloud and its last globals, then per site its edges (state, round, accuracy, loss, traffic) and
devices (state, queue, drops, acks, round trip, last error), and the count of unreadable messages.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import paho.mqtt.client as mqtt
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from broker import topics
from broker.address import BrokerAddress
from megace.dashboard.model import Fleet, Member

STATE_STYLE = {"online": "green", "offline": "red", "unknown": "grey50"}


class Watcher:
    """Subscribes to status, metrics and events and keeps the fleet model under a lock."""

    def __init__(self, address: BrokerAddress) -> None:
        self.fleet = Fleet()
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"megace-top-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv311, clean_session=True)
        if address.username:
            self.client.username_pw_set(address.username, address.password)
        if address.tls:
            self.client.tls_set_context(address.ssl_context())
        self.client.on_connect = lambda c, *_: c.subscribe(
            [(topics.all_status(), 0), (topics.all_metrics(), 0), (topics.all_events(), 0)])
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = self._on_message
        self.address = address

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.fleet.handle(msg.topic, bytes(msg.payload))

    def start(self, timeout: float = 10.0) -> Watcher:
        self.client.connect(self.address.host, self.address.port, keepalive=self.address.keepalive)
        self.client.loop_start()
        if not self.subscribed.wait(timeout):
            raise TimeoutError(f"could not subscribe on {self.address}")
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _state(m: Member) -> Text:
    return Text(m.state, style=STATE_STYLE.get(m.state, ""))


def _num(value: Any, fmt: str = "{:.3f}") -> str:
    return fmt.format(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def render(fleet: Fleet) -> Group:
    """The screen: one table for the cloud, one per site, and the error line."""
    parts: list[Any] = []
    cloud = Table(title="cloud", expand=True, title_justify="left")
    for col in ("id", "state", "version", "strategy", "accepted", "rejected", "last globals (contributors)"):
        cloud.add_column(col)
    last = "; ".join(f"v{g['version']}: {','.join(g['contributors'])}" for g in fleet.globals[-3:]) or "-"
    for ident, m in sorted(fleet.cloud.items()):
        mm = m.metrics
        cloud.add_row(ident, _state(m), _num(mm.get("version"), "{}"), str(mm.get("strategy", "-")),
                      _num(mm.get("accepted"), "{}"), _num(mm.get("rejected"), "{}"), last)
    parts.append(cloud)
    for site in sorted(fleet.sites):
        members = fleet.sites[site]
        t = Table(title=f"site {site}", expand=True, title_justify="left")
        for col in ("member", "state", "round / queued", "acc / dropped", "loss / acked", "up MB / rtt p50",
                    "down MB / rtt p99", "last error"):
            t.add_column(col)
        for ident, m in sorted(members["edge"].items()):
            r = m.rounds[-1] if m.rounds else {}
            mm = m.metrics
            t.add_row(f"edge {ident}", _state(m), _num(r.get("round", mm.get("round")), "{}"),
                      _num(r.get("acc"), "{:.1%}"), _num(r.get("loss")),
                      _num(mm.get("bytes_up", 0) / 1e6 if mm else None, "{:.2f}"),
                      _num(mm.get("bytes_down", 0) / 1e6 if mm else None, "{:.2f}"), "")
        for ident, m in sorted(members["device"].items()):
            mm = m.metrics
            rtt = mm.get("rtt_ms") or {}
            err = mm.get("last_error") or {}
            t.add_row(f"  device {ident}", _state(m), _num(mm.get("queued"), "{}"), _num(mm.get("dropped"), "{}"),
                      _num(mm.get("acked"), "{}"), _num(rtt.get("p50"), "{:.1f} ms"), _num(rtt.get("p99"), "{:.1f} ms"),
                      str(err.get("code", "")))
        parts.append(t)
    style = "bold red" if fleet.errors else "grey50"
    parts.append(Text(f"{fleet.messages} messages, {fleet.errors} errors (unreadable messages)", style=style))
    parts.extend(Text(f"  {e}", style="grey50") for e in fleet.recent_errors[-3:])
    return Group(*parts)


def run_top(address: BrokerAddress, *, once: bool = False, wait_s: float = 2.0, console: Console | None = None,
            refresh_s: float = 0.5) -> Fleet:
    """Live view until Ctrl-C; with ``once``, collect for ``wait_s`` seconds, print one screen and return."""
    from rich.live import Live

    console = console or Console()
    watcher = Watcher(address).start()
    try:
        if once:
            time.sleep(wait_s)
            with watcher.lock:
                console.print(render(watcher.fleet))
                return watcher.fleet
        with Live(console=console, refresh_per_second=4, screen=False) as live:
            while True:
                with watcher.lock:
                    live.update(render(watcher.fleet))
                time.sleep(refresh_s)
    except KeyboardInterrupt:
        return watcher.fleet
    finally:
        watcher.stop()
