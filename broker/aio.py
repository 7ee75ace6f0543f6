"""asyncio side of the bus for edge agents, the cloud and dashboards (aiomqtt).

One place builds clients (TCP_NODELAY, last will, TLS, credentials) and publishes
possibly-chunked payloads, so the agents share one idiom. aiomqtt has no built-in
reconnect: services run a fresh client per attempt through :class:`broker.session.Session`.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import aiomqtt
import paho.mqtt.client as mqtt

from broker.address import BrokerAddress
from broker.chunking import DEFAULT_MAX_PACKET, frames
from broker.protocol import V5, V311, aiomqtt_options, watch_connect

NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


def make_client(
    address: BrokerAddress,
    *,
    identifier: str,
    will: aiomqtt.Will | None = None,
    max_queued_incoming: int = 10_000,
    clean_session: bool = True,
    queue_type: type[asyncio.Queue[aiomqtt.Message]] | None = None,
    max_inflight: int | None = None,
    version: str | None = None,
) -> aiomqtt.Client:
    """An aiomqtt client that speaks MQTT ``version`` (``"5"`` or ``"3.1.1"``).

    Without ``version``: MQTT 5 if the address asks for ``5``, else 3.1.1 (what every broker megace supports
    speaks); ``auto`` needs a negotiation across attempts, which :class:`broker.session.Session` does. With
    MQTT 5 a persistent session (``clean_session=False``) expires ``address.session_expiry`` seconds after
    the client left; a connection closed before CONNACK fails at once (:func:`broker.protocol.watch_connect`).

    ``queue_type`` is aiomqtt's incoming queue class (built with ``maxsize=max_queued_incoming``);
    :class:`broker.session.CountingQueue` counts what a full queue drops.  ``max_inflight`` is how many
    QoS > 0 publishes may await their acknowledgement at once (paho's default is 20); the caller that
    sets it bounds its own concurrent publishes to it, so none wait inside paho, and aiomqtt's "pending
    publish calls" warning is raised to just above it (it warns at 10 by default, below paho's own limit).
    """
    if version is None:
        version = V5 if address.protocol == V5 else V311
    client = GuardedClient(
        address.host,
        address.port,
        identifier=identifier,
        username=address.username,
        password=address.password,
        tls_context=address.ssl_context(),
        keepalive=address.keepalive,
        timeout=address.timeout,
        will=will,
        **aiomqtt_options(version, clean_session=clean_session, session_expiry=address.session_expiry),
        max_queued_incoming_messages=max_queued_incoming,
        queue_type=queue_type,
        socket_options=NODELAY,
        max_inflight_messages=max_inflight,
    )
    watch_connect(client)
    if max_inflight is not None:
        client.pending_calls_threshold = max_inflight + PUBLISH_HEADROOM
    return client


class GuardedClient(aiomqtt.Client):
    """aiomqtt's client, without its socket race on a dropped connection.

    aiomqtt 2.5 answers paho's "register write" by scheduling ``loop.add_writer(fd, ...)`` with
    ``call_soon_threadsafe``. When the broker drops the connection before that runs, paho has closed the
    socket and asyncio logs ``OSError: [Errno 9] Bad file descriptor`` with a traceback (seen when a broker
    was SIGKILLed under load; the session reconnected, but a traceback in a service's log reads as a crash,
    and a reused fd number would get the old callback). This schedules the same call, skipped when the
    socket is no longer paho's.
    """

    def _on_socket_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        def write() -> None:  # as aiomqtt's: a failed write is the connection's end
            try:
                client.loop_write()
            except Exception as exc:
                if not self._disconnected.done():
                    self._disconnected.set_exception(exc)

        def register() -> None:
            if client.socket() is sock:  # not closed (or replaced) since paho asked
                self._loop.add_writer(sock.fileno(), write)

        self._loop.call_soon_threadsafe(register)


#: publishes beside a bounded publisher's window (status, metrics, an upload chunk) before aiomqtt warns
PUBLISH_HEADROOM = 8


async def publish(
    client: aiomqtt.Client,
    topic: str,
    payload: bytes,
    *,
    sender: str,
    seq: int = 0,
    qos: int = 1,
    retain: bool = False,
    max_packet: int = DEFAULT_MAX_PACKET,
) -> int:
    """Publish ``payload`` on ``topic``, chunked if larger than ``max_packet``; returns bytes sent."""
    sent = 0
    for t, p in frames(topic, payload, sender=sender, seq=seq, max_packet=max_packet):
        await publish_one(client, t, p, qos=qos, retain=retain)
        sent += len(p)
    return sent


async def publish_one(client: aiomqtt.Client, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                      timeout: float | None = None) -> None:
    """``client.publish`` that never loses a cancellation.

    aiomqtt waits for the PUBACK with ``asyncio.wait_for``, which in Python 3.11 returns normally when
    the acknowledgement and a ``cancel()`` arrive together; the service loop calling it would then run
    on, and the session that cancelled it would wait for it forever. The cancellation is re-raised.
    """
    await client.publish(topic, payload, qos=qos, retain=retain, timeout=timeout)
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait for ``event`` at most ``timeout`` seconds (None: no limit); True if it was set.

    Not ``asyncio.wait_for``: in Python 3.11 it can swallow a cancellation that races the event being
    set, and a service task cancelled at that moment would loop on forever (a session that never ends).
    """
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True
