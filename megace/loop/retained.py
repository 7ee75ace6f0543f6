"""Clear what earlier runs left retained on a broker that outlives runs, chunk topics included.

A chunked global travels as ``.../global/chunk/N``; the cloud clears surplus chunk topics only of
transfers it made itself, so a fresh cloud cannot know what an earlier run left. Clearing just the
whole-message topics left the chunks, and the next run's edges reassembled a stale global from them.
So the retained topics are discovered, not guessed: subscribe to the cloud's downlink tree and to the
chunk filters of every name the loop knows, note each retained message for a short window, and
publish an empty retained payload (which deletes it) to every one found and every name given.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt

from broker import topics
from broker.address import BrokerAddress
from broker.exact_chunks import ExactChunks
from broker.protocol import paho_clean_options
from megace.loop.configs import CLOUD_ID, EdgePlan

if TYPE_CHECKING:
    from megace.loop.devices import SimulatedDevice

log = logging.getLogger(__name__)

DISCOVER_CHUNKS = 64
"""Chunk names per cloud topic looked up by exact name (16 MiB of stale global at 256 KiB a chunk)."""


def loop_topics(plans: Iterable[EdgePlan], devices: Iterable[SimulatedDevice]) -> list[str]:
    """Every retained topic a closed loop's parts publish: the global, each site's feedback, and the status,
    metrics and events of the cloud, each edge and each device, plus the devices' registrations."""
    cloud = topics.Role.CLOUD, CLOUD_ID
    names = [topics.global_down(), topics.status(*cloud), topics.metrics(*cloud), topics.events(*cloud)]
    for p in plans:
        edge = topics.Role.EDGE, p.ident, p.site
        names += [topics.site_feedback(p.site), topics.status(*edge), topics.metrics(*edge), topics.events(*edge),
                  topics.device_up(p.site, f"e{p.index}-eval", topics.Uplink.REGISTER)]
    for d in devices:
        dev = topics.Role.DEVICE, d.name, d.site
        names += [topics.device_up(d.site, d.name, topics.Uplink.REGISTER), topics.status(*dev), topics.metrics(*dev)]
    return names


def downlink_tree() -> str:
    """Every global and per-site feedback topic and their chunks: all retained by the cloud."""
    return f"{topics.ROOT}/cloud/down/#"


def _client(address: BrokerAddress) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"megace-clear-{uuid.uuid4().hex[:8]}",
                    **paho_clean_options(address.protocol))
    if address.username:
        c.username_pw_set(address.username, address.password)
    if address.tls:
        c.tls_set_context(address.ssl_context())
    return c


def find_retained(address: BrokerAddress, filters: Iterable[str], *, quiet_s: float = 0.3,
                  max_s: float = 3.0) -> set[str]:
    """Topics holding a retained message under ``filters``: the broker sends them right after SUBACK,
    so listening until ``quiet_s`` pass without one (at most ``max_s``) finds them all."""
    wanted = list(filters)
    found: set[str] = set()
    cond = threading.Condition()
    state = {"subscribed": False, "last": time.monotonic()}

    def on_connect(client: mqtt.Client, *_: Any) -> None:
        client.subscribe([(f, 1) for f in wanted])

    def on_subscribe(*_: Any) -> None:
        with cond:
            state["subscribed"], state["last"] = True, time.monotonic()
            cond.notify_all()

    def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with cond:
            if msg.retain and msg.payload:
                found.add(msg.topic)
            state["last"] = time.monotonic()

    c = _client(address)
    c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
    c.connect(address.host, address.port, keepalive=address.keepalive)
    c.loop_start()
    try:
        with cond:
            if not cond.wait_for(lambda: state["subscribed"], 10.0):
                raise TimeoutError(f"could not subscribe on {address} to find retained topics")
            deadline = time.monotonic() + max_s
            while time.monotonic() < deadline and time.monotonic() - float(state["last"]) < quiet_s:
                cond.wait(0.05)
    finally:
        c.disconnect()
        c.loop_stop()
    return found


def clear_retained(address: BrokerAddress, names: Iterable[str], timeout: float = 10.0) -> list[str]:
    """Delete the retained message of every topic in ``names`` and of every retained topic found under
    the cloud's downlink tree or under ``names``' chunk topics; returns the topics cleared.

    A PUBACK does not prove the delete happened: amqtt acknowledges a publish before its client loop acts on it
    and drops what is still queued when the client disconnects (seen as a stale chunk left behind in a loaded
    test run). So every topic is looked up again by exact name afterwards and cleared again while it is still
    there; ``TimeoutError`` if one survives ``timeout``."""
    names = list(names)
    # exact chunk names of the cloud's retained transfers too: RabbitMQ delivers no retained message through
    # the wildcards above (broker.capabilities), but does to an exact name, which edges now read
    cloud_down = [n for n in names if n.startswith(f"{topics.ROOT}/cloud/down/")]
    filters = [downlink_tree(), *(f"{n}/chunk/+" for n in names),
               *ExactChunks(cloud_down, initial=DISCOVER_CHUNKS).filters()]
    stale = sorted(set(names) | find_retained(address, filters))
    deadline = time.monotonic() + timeout
    left = stale
    while left:
        try:
            _publish_empty(address, left, timeout)
        except (ConnectionError, RuntimeError, TimeoutError) as exc:  # amqtt may drop a client it just accepted
            if time.monotonic() > deadline:
                raise
            log.info("clearing retained topics on %s: %s; again", address, exc)
        time.sleep(0.05)  # amqtt tidies up a client after it left; the next one connecting meanwhile can crash it
        left = sorted(find_retained(address, left))
        if left and time.monotonic() > deadline:
            raise TimeoutError(f"{len(left)} retained topics on {address} survived clearing, e.g. {left[:3]}")
    return stale


def _publish_empty(address: BrokerAddress, names: list[str], timeout: float) -> None:
    """An empty retained payload (a delete) to each of ``names``, each acknowledged (QoS 1)."""
    done = threading.Event()
    c = _client(address)
    c.on_connect = lambda *_: done.set()
    c.connect(address.host, address.port, keepalive=address.keepalive)
    c.loop_start()
    try:
        if not done.wait(10.0):
            raise TimeoutError(f"could not connect to {address} to clear retained topics")
        infos = [c.publish(t, b"", qos=1, retain=True) for t in names]
        for info in infos:
            info.wait_for_publish(timeout)
    finally:
        c.disconnect()
        c.loop_stop()
