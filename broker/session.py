"""One connection helper for the asyncio services (edge agent, cloud aggregator).

:class:`Session` keeps a service connected: a fresh aiomqtt client per attempt (aiomqtt clients
cannot be reused after a disconnect), jittered exponential backoff between failed attempts that
starts over after every healthy session, and an incoming queue that counts what it drops.
:func:`payload_bytes` is the one conversion of a received payload to ``bytes``; :func:`ack`
acknowledges a message once the service made it durable (``manual_ack``).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

import aiomqtt

from broker.address import BrokerAddress
from broker.aio import make_client, wait_event
from broker.metrics import Counters
from broker.protocol import Negotiator, probe_v5

log = logging.getLogger(__name__)

#: the counter a message dropped at a full incoming queue is counted under
DROPPED = "mqtt_dropped"


class CountingQueue(asyncio.Queue[aiomqtt.Message]):
    """aiomqtt's incoming queue (``queue_type``) that counts the messages it refuses.

    aiomqtt builds its queue as ``queue_type(maxsize=max_queued_incoming_messages)`` and, when
    ``put_nowait`` raises :class:`asyncio.QueueFull`, logs and discards the message. This class
    counts the drop in ``counters`` under ``counter`` and raises as aiomqtt expects. Bind it to a
    service's counters with :meth:`counting_into` (aiomqtt only passes ``maxsize``).
    """

    counters: Counters | None = None
    counter: str = DROPPED

    def put_nowait(self, item: aiomqtt.Message) -> None:
        try:
            super().put_nowait(item)
        except asyncio.QueueFull:
            if self.counters is not None:
                self.counters.inc(self.counter)
            raise

    @classmethod
    def counting_into(cls, counters: Counters, counter: str = DROPPED) -> type[CountingQueue]:
        """A subclass whose instances count drops in ``counters`` (pass it as aiomqtt's ``queue_type``)."""
        return type(cls.__name__, (cls,), {"counters": counters, "counter": counter})


def payload_bytes(payload: Any) -> bytes:
    """A received payload as ``bytes`` (aiomqtt types it ``bytes | bytearray | str | int | float | None``)."""
    if type(payload) is bytes:
        return payload
    if isinstance(payload, (bytes, bytearray)):
        return bytes(payload)
    return b"" if payload is None else str(payload).encode()


def ack(client: aiomqtt.Client, message: aiomqtt.Message) -> None:
    """Acknowledge ``message`` to the broker (for a :class:`Session` with ``manual_ack``; QoS 0 needs none).

    MQTT 3.1.1 wants PUBACKs in the order the messages arrived: call this in arrival order.
    """
    if message.qos > 0:
        client._client.ack(message.mid, message.qos)


def backoff_delay(attempt: int, base_delay: float, max_delay: float, jitter: float) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (0-based) of an outage.

    Nominally ``base_delay * 2**attempt`` capped at ``max_delay``, then scaled by a uniform
    factor in ``[1 - jitter, 1]`` so that clients cut off together do not return together.
    """
    nominal = min(max_delay, base_delay * (2 ** min(attempt, 16)))
    return nominal * (1.0 - jitter * random.random())


Serve = Callable[[aiomqtt.Client, int], Awaitable[None]]


class Session:
    """Connects, runs ``serve`` while connected, reconnects after broker errors; ``await run(stop)``.

    Args:
        address: the broker to connect to.
        serve: ``await serve(client, attempt)`` runs one connected session. ``attempt`` is the
            number of attempts this outage took before this one (0 on the first try). Returning
            ends :meth:`run`; an :class:`aiomqtt.MqttError` ends the session and starts
            reconnecting; any other exception propagates out of :meth:`run`.
        identifier: the MQTT client id; keep it stable so a persistent session is found again.
        counters: where ``connects``, ``disconnects`` (sessions lost), ``connect_failures``
            (attempts that never connected) and ``mqtt_dropped`` (incoming messages discarded at a
            full queue) are counted. A private :class:`Counters` when not given.
        will: the last will the broker publishes if the connection dies (an offline status).
        clean_session: ``False`` for a persistent session: the broker queues QoS 1 messages for
            the subscriptions while this client is away.
        max_queued_incoming: bound of aiomqtt's incoming queue; a message arriving when it is full
            is discarded and counted (``0`` means unbounded).
        base_delay: nominal wait in seconds after the first failed attempt of an outage; it
            doubles with each further failure.
        max_delay: cap on the nominal wait, in seconds.
        jitter: fraction of the wait that is random (``0.5``: between half and all of it).
        on_error: called (no arguments) after every attempt or session that ended with a broker
            error, before the next attempt; for per-connection bookkeeping.
        name: how log lines call this service (``"edge e1"``).
        stable_after: seconds a session must last to count as healthy. A broker that accepts and
            then drops the connection at once (a client-id clash, a refused subscription) is
            retried with backoff, not in a tight loop.
        manual_ack: when True, a received QoS 1 message is acknowledged to the broker only when
            the service calls :func:`ack` for it (after it made the message durable); until then a
            persistent session gets it again after a reconnect. The broker's in-flight window
            (``max_inflight_messages``) bounds how many may wait unacknowledged.
        max_inflight: QoS 1 publishes this client may have awaiting PUBACK at once (None: paho's 20).
            A service that bounds its own concurrent publishes sets it to that bound, so bursts wait
            in the service's queue, where they are counted and dropped when it is full, not in paho.

    After a healthy session the backoff starts over: the next attempt is immediate and a further
    outage waits ``base_delay`` first again.
    """

    def __init__(
        self,
        address: BrokerAddress,
        serve: Serve,
        *,
        identifier: str,
        counters: Counters | None = None,
        will: aiomqtt.Will | None = None,
        clean_session: bool = True,
        max_queued_incoming: int = 10_000,
        base_delay: float = 0.2,
        max_delay: float = 10.0,
        jitter: float = 0.5,
        on_error: Callable[[], None] | None = None,
        name: str = "",
        stable_after: float = 1.0,
        manual_ack: bool = False,
        max_inflight: int | None = None,
    ) -> None:
        if base_delay < 0 or max_delay < base_delay or not 0.0 <= jitter <= 1.0:
            raise ValueError("need 0 <= base_delay <= max_delay and 0 <= jitter <= 1")
        self.address = address
        self.identifier = identifier
        self.counters = counters if counters is not None else Counters()
        self.will = will
        self.clean_session = clean_session
        self.max_queued_incoming = max_queued_incoming
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.jitter = jitter
        self.name = name or identifier
        self.stable_after = stable_after
        self.manual_ack = manual_ack
        self.max_inflight = max_inflight
        self._serve = serve
        self._on_error = on_error
        self._queue_type = CountingQueue.counting_into(self.counters)
        self.negotiator = Negotiator(address.protocol, name=self.name, counters=self.counters)
        """The MQTT version (``address.protocol``: auto, 5, 3.1.1), remembered across reconnects."""
        self._endpoint = 0  # which of ``address.endpoints`` the next attempt uses (a cluster's nodes in turn)

    def client(self) -> aiomqtt.Client:
        """A fresh (not yet connected) client with this session's settings and drop-counting queue."""
        client = make_client(
            self.address.endpoint(self._endpoint),
            identifier=self.identifier,
            will=self.will,
            max_queued_incoming=self.max_queued_incoming,
            clean_session=self.clean_session,
            queue_type=self._queue_type,
            max_inflight=self.max_inflight,
            version=self.negotiator.version,
        )
        if self.manual_ack:
            # aiomqtt 2.5 has no manual-ack option yet (empicano/aiomqtt#345); paho, underneath, does.
            # Set before connecting, so not even the first message of a resumed session is auto-acked.
            client._client.manual_ack_set(True)
        return client

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Serve until ``serve`` returns, ``stop`` is set (checked between attempts) or the task is cancelled."""
        attempt = 0
        loop = asyncio.get_running_loop()
        while stop is None or not stop.is_set():
            connected = False
            since = loop.time()
            if self.negotiator.undecided and not self.clean_session:  # auto: ask before sending v5 properties
                self.negotiator.probed(await loop.run_in_executor(
                    None, probe_v5, self.address.endpoint(self._endpoint), self.identifier))
            try:
                async with self.client() as client:
                    if not client._client.is_connected():
                        # aiomqtt 2.5 forgets a disconnect that lands between CONNACK and the end of
                        # ``__aenter__`` (it replaces the finished ``_disconnected`` future): without this
                        # check a client kicked at once (a client-id clash) would wait on messages forever
                        raise aiomqtt.MqttError("disconnected while connecting")
                    connected = True
                    since = loop.time()
                    self.counters.inc("connects")
                    self.negotiator.connected()
                    log.info("%s connected to %s (attempt %d)", self.name, self.address.endpoint(self._endpoint),
                             attempt)
                    await self._serve(client, attempt)
                    return
            except aiomqtt.MqttError as exc:
                if not connected and self.negotiator.refused_by(exc):
                    continue  # auto: the broker speaks 3.1.1 only; retry at once in 3.1.1 (counted, logged)
                self.counters.inc("disconnects" if connected else "connect_failures")
                self._endpoint += 1  # with several nodes, the next attempt goes to the next one (failover)
                log.warning("%s: broker connection %s: %s", self.name, "lost" if connected else "failed", exc)
                if self._on_error is not None:
                    self._on_error()
            if connected and loop.time() - since >= self.stable_after:
                attempt = 0  # a healthy session: the next attempt is immediate, backoff from scratch
                continue
            delay = backoff_delay(attempt, self.base_delay, self.max_delay, self.jitter)
            attempt += 1
            log.warning("%s: broker %s unreachable, retrying in %.1f s", self.name, self.address, delay)
            if stop is None:
                await asyncio.sleep(delay)
            else:
                await wait_event(stop, delay)
