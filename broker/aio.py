"""asyncio side of the bus for edge agents, the cloud and dashboards (aiomqtt).

One place builds clients (TCP_NODELAY, last will, TLS, credentials) and publishes
possibly-chunked payloads, so the agents share one idiom. aiomqtt has no built-in
reconnect: services wrap a fresh client per attempt in :func:`reconnecting`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from collections.abc import AsyncIterator

import aiomqtt

from broker.address import BrokerAddress
from broker.chunking import DEFAULT_MAX_PACKET, frames

log = logging.getLogger(__name__)

NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


def make_client(
    address: BrokerAddress,
    *,
    identifier: str,
    will: aiomqtt.Will | None = None,
    max_queued_incoming: int = 10_000,
    clean_session: bool = True,
) -> aiomqtt.Client:
    """An aiomqtt client that speaks MQTT 3.1.1 (works on every broker megace supports)."""
    return aiomqtt.Client(
        address.host,
        address.port,
        identifier=identifier,
        username=address.username,
        password=address.password,
        tls_context=address.ssl_context(),
        keepalive=address.keepalive,
        will=will,
        protocol=aiomqtt.ProtocolVersion.V311,
        clean_session=clean_session,
        max_queued_incoming_messages=max_queued_incoming,
        socket_options=NODELAY,
    )


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
        await client.publish(t, p, qos=qos, retain=retain)
        sent += len(p)
    return sent


async def reconnecting(
    address: BrokerAddress, *, base_delay: float = 0.2, max_delay: float = 10.0
) -> AsyncIterator[int]:
    """Yield attempt numbers forever, sleeping with jittered exponential backoff between them.

    Usage: ``async for attempt in reconnecting(addr): try: async with make_client(...) ... except MqttError: ...``
    The caller resets the delay by breaking out and re-entering after a healthy session.
    """
    attempt = 0
    while True:
        yield attempt
        delay = min(max_delay, base_delay * (2 ** min(attempt, 16)))
        attempt += 1
        log.warning("broker %s unreachable, retrying in %.1f s", address, delay)
        await asyncio.sleep(delay * (0.5 + random.random() / 2))
