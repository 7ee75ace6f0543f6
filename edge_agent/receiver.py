"""The ingest receiver: a process that only receives device data, logs it durably and acknowledges it.

Why a process: on a 2-core gateway the agent's event loop paid for MQTT I/O, manual acknowledgements,
the group commit and decode/validate/buffer of every record on one core, about twice what a bare
subscriber pays. With ``ingest_receiver = "process"`` this process does the first three on one core
(:class:`IngestReceiver`: aiomqtt session, :class:`~edge_agent.ingestlog.IngestLog`,
:class:`~edge_agent.acks.DurableAcks`) and the agent decodes, validates and buffers on the other, by
reading the same log (:mod:`edge_agent.receiver_host`, :mod:`edge_agent.logtail`).

Guarantees: a message is acknowledged only after the log holds it (``kill -9`` of either process loses
nothing acknowledged); the receiver decodes nothing, so every message on its subscriptions is logged
and the agent's sequence guards drop duplicates as before; when the agent's reader lags more than
``max_lag_bytes`` behind, acknowledgements are held, and the broker stops sending at its in-flight window.

It holds the edge's data session (client id ``megace-edge-<id>``, persistent): every device uplink, through
the filters an inline agent uses (one ordered stream per device on every broker); inference requests are
acknowledged and not logged: the agent answers those, and takes globals and feedback, on its own connection.

Protocol with the agent (one line each): stdin: the settings as JSON, then ``p <segment> <offset>`` (the
reader's position); EOF asks for a clean stop. stdout: ``connected``, ``ready`` (subscribed), ``c``
(the log grew), ``n <json>`` (counter increments).

    python -m edge_agent.receiver   # started by the agent; not a command for people
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO, Any

import aiomqtt
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from broker import topics
from broker.address import BrokerAddress
from broker.metrics import Counters
from broker.protocol import AUTO, DEFAULT_PROTOCOL, V5
from broker.session import Session
from edge_agent import receiver_mqtt
from edge_agent.acks import DurableAcks
from edge_agent.ingestlog import IngestLog

log = logging.getLogger(__name__)

_INFER = f"/up/{topics.Uplink.INFER.value}"
_INFER_CHUNK = f"{_INFER}/chunk/"

#: counters the agent keeps under the receiver's own name (the rest are prefixed ``receiver_``)
SHARED_COUNTERS = frozenset({"ingest_logged", "ingest_commits", "ingest_log_failures", "ingest_backpressure",
                             "mqtt_dropped", "bytes_down"})


def data_filters(site: str) -> list[str]:
    """The receiver's subscriptions: every device uplink (and its chunks), the filters an inline agent uses.

    One filter for every kind, not one per kind: NATS makes a consumer per subscription filter and does not
    order deliveries across them, so a device's records overtook its registration and were refused as
    unregistered (a loaded NATS cluster run lost 5 that way). Inference requests come through it as well;
    the receiver acknowledges them without logging them (the agent takes them on its own connection)."""
    return topics.subscriptions(topics.site_device_uplinks(site))


def is_infer(topic: str) -> bool:
    """An inference request (or one of its chunks): the agent's to answer, not the log's."""
    return topic.endswith(_INFER) or _INFER_CHUNK in topic


def infer_filters(site: str) -> list[str]:
    """What the agent's own connection keeps of the device uplinks: inference requests, answered where the model is."""
    base = topics.site_device_uplinks(site).rsplit("/", 1)[0]
    return topics.subscriptions(f"{base}/{topics.Uplink.INFER.value}")


def data_client_id(edge_id: str) -> str:
    """The data session's client id: the one an inline agent uses, so its queued messages carry over."""
    return f"megace-edge-{edge_id}"


def control_client_id(edge_id: str) -> str:
    """The agent's own connection beside a receiver process (the username of role ``control``,
    ``megace.provision.identity``)."""
    return f"megace-ctl-{edge_id}"


@dataclass
class ReceiverSettings:
    """What the agent hands its receiver (JSON on stdin, so credentials in the URL stay off the command line)."""

    broker: str
    site: str
    edge_id: str
    directory: str
    fsync: bool = True
    clean_session: bool = False
    mqtt_queue: int = 100_000
    max_lag_bytes: int = 64 * 1024 * 1024
    segment_bytes: int = 64 * 1024 * 1024
    """A new log segment is started beyond this size, so the agent can delete what its checkpoints cover."""
    receive_maximum: int = 1000
    """MQTT 5 in-flight window asked of the broker (see :class:`WindowedSession`); 0: the broker's."""
    consumed: list[int] = field(default_factory=lambda: [0, 0])
    """The agent's reader position ``[segment, offset]`` at start."""
    log_level: str = "WARNING"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, line: str | bytes) -> ReceiverSettings:
        return cls(**json.loads(line))


OnMessage = Callable[[Any, Any, mqtt.MQTTMessage], None]


class WindowedSession(Session):
    """A :class:`Session` whose MQTT 5 connections ask for a ``receive_maximum`` in-flight window.

    Why: the receiver acknowledges a message only after its group commit, so with the broker's window
    (Mosquitto's ``max_inflight_messages``, 20 by default, all MQTT 3.1.1 offers) the broker stops after
    20 messages until an fsync returns: measured, 7.5k records/s against a bare subscriber's 15k. MQTT 5's
    Receive Maximum lets the subscriber itself say how many may be in flight; the log commits them in
    larger groups while the broker keeps sending. On 3.1.1 (a broker that refuses 5) the broker's window applies.
    """

    def __init__(self, *args: Any, receive_maximum: int, on_message: OnMessage, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.receive_maximum = receive_maximum
        self.on_message = on_message

    def client(self) -> aiomqtt.Client:
        client = super().client()
        # paho's messages straight to the receiver, on the loop's thread as aiomqtt drives paho: no Message
        # conversion, no queue, no task per message (aiomqtt's iterator cost about half this loop's time);
        # QoS 1 publishes, reads and PUBACKs through the fast paths of :mod:`edge_agent.receiver_mqtt`
        client._client.on_message = self.on_message
        receiver_mqtt.install(client._client, self.on_message, asyncio.get_running_loop())
        if self.negotiator.version == V5 and self.receive_maximum:
            props = client._properties or Properties(PacketTypes.CONNECT)
            props.ReceiveMaximum = self.receive_maximum
            client._properties = props
        return client


class IngestReceiver:
    """The background loop: connect, subscribe, log and acknowledge, until ``stop``; then drain and disconnect.

    ``notify(line)`` tells the agent (``connected``, ``ready``, ``c``); tests drive it in-process.
    """

    def __init__(self, settings: ReceiverSettings, notify: Any) -> None:
        self.settings = settings
        self.counters = Counters()
        self.notify = notify
        self.log = IngestLog(settings.directory, fsync=settings.fsync)
        self.consumed = (int(settings.consumed[0]), int(settings.consumed[1]))
        self.log.advance_to(self.consumed[0])  # never behind the reader (and never after a torn tail)
        self.acks = DurableAcks(self.log, self.counters, on_commit=self._committed, hold_acks=self.lagging)
        self.stop = asyncio.Event()
        self.filters = data_filters(settings.site)

    # -- back-pressure ------------------------------------------------------------------
    def lag_bytes(self) -> int:
        """Bytes logged that the agent's reader has not consumed yet."""
        segment, offset = self.consumed
        return sum(size for n, size in self.log.sizes.items() if n >= segment) - offset

    def lagging(self) -> bool:
        return self.lag_bytes() > self.settings.max_lag_bytes

    def consumed_at(self, segment: int, offset: int) -> None:
        """The agent's reader reached ``(segment, offset)``: forget older sizes, maybe resume acknowledging."""
        self.consumed = (segment, offset)
        for n in [n for n in self.log.sizes if n < segment]:
            del self.log.sizes[n]
        self.acks.wake()

    def _committed(self) -> None:
        self.notify("c")
        current = self.log.segment
        if self.log.sizes.get(current, 0) >= self.settings.segment_bytes:
            self.log.mark()  # the next commit opens a new segment; the agent drops old ones after checkpoints

    # -- the loop -----------------------------------------------------------------------
    async def run(self) -> None:
        """Serve until :attr:`stop` is set; what was received is logged and acknowledged before returning."""
        s = self.settings
        address = BrokerAddress.from_url(s.broker)
        if address.protocol == DEFAULT_PROTOCOL and s.receive_maximum:
            address = replace(address, protocol=AUTO)  # MQTT 5 where the broker has it: the receive window
        session = WindowedSession(address, self._serve, identifier=data_client_id(s.edge_id),
                                  counters=self.counters, clean_session=s.clean_session,
                                  max_queued_incoming=s.mqtt_queue, name=f"edge {s.edge_id} receiver",
                                  manual_ack=True, receive_maximum=s.receive_maximum, on_message=self._on_message)
        try:
            await session.run(self.stop)
        finally:
            self.acks.close()

    async def _serve(self, client: aiomqtt.Client, attempt: int = 0) -> None:
        self.notify("connected")
        await client.subscribe([(f, 1) for f in self.filters])
        # an inline agent's session (the same client id) also subscribed to the rest: not this process's to take;
        # a receiver before this one subscribed per kind (each would now deliver its messages a second time)
        site = self.settings.site
        base = topics.site_device_uplinks(site).rsplit("/", 1)[0]
        per_kind = [f for kind in topics.Uplink for f in topics.subscriptions(f"{base}/{kind.value}")]
        stale = [f for f in (*per_kind, *topics.subscriptions(topics.global_down()),
                             *topics.subscriptions(topics.site_feedback(site))) if f not in self.filters]
        await client.unsubscribe(stale)
        self.notify("ready")
        tasks = [asyncio.create_task(self._watch(client), name="receiver-watch"),
                 asyncio.create_task(self.acks.run(client), name="receiver-acks")]
        stopper = asyncio.create_task(self.stop.wait(), name="receiver-stop")
        try:
            done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
            if stopper in done:
                tasks[0].cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await tasks[0]
                tasks[1].cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await tasks[1]
                await self.acks.drain(client)  # everything received is logged and acknowledged
                receiver_mqtt.flush_acks(client._client)  # those PUBACKs go before the DISCONNECT
                return
            for task in done:
                if task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            stopper.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, stopper, return_exceptions=True)
            self.acks.reset()

    def _on_message(self, _client: Any, _userdata: Any, message: mqtt.MQTTMessage | receiver_mqtt.Received) -> None:
        """paho's callback: log (buffered; committed in groups by :class:`DurableAcks`), to be acknowledged after."""
        payload = message.payload
        self.counters.inc("bytes_down", len(payload))
        topic = message.topic
        if is_infer(topic):  # answered on the agent's own connection: acknowledged in order, never logged
            self.counters.inc("infer_skipped")
            self.acks.received(message, topic, payload, durable=False)
            return
        self.acks.received(message, topic, payload, durable=True)

    @staticmethod
    async def _watch(client: aiomqtt.Client) -> None:
        """Raises when the connection drops (nothing is ever queued: messages go to :meth:`_on_message`)."""
        async for _ in client.messages:
            pass


# ---------------------------------------------------------------------------- the process
class _Pipe:
    """The receiver's side of the protocol: lines out on (a duplicate of) stdout, counters batched."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.last: dict[str, Any] = {}

    def __call__(self, line: str) -> None:
        with contextlib.suppress(BrokenPipeError):
            self.out.write(line.encode() + b"\n")
            self.out.flush()

    def counters(self, counters: Counters) -> None:
        now = counters.snapshot()
        delta = {k: v - self.last.get(k, 0) for k, v in now.items() if v != self.last.get(k, 0)}
        self.last = now
        if delta:
            self("n " + json.dumps(delta))


async def _main(settings: ReceiverSettings, out: IO[bytes], stdin: IO[bytes]) -> None:
    pipe = _Pipe(out)
    receiver = IngestReceiver(settings, pipe)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), stdin)

    async def commands() -> None:
        while line := await reader.readline():  # EOF: the agent asks for a stop, or is gone
            parts = line.split()
            if len(parts) == 3 and parts[0] == b"p":
                receiver.consumed_at(int(parts[1]), int(parts[2]))
        receiver.stop.set()

    async def report() -> None:
        while True:
            await asyncio.sleep(0.25)
            pipe.counters(receiver.counters)

    helpers = [asyncio.create_task(commands()), asyncio.create_task(report())]
    try:
        await receiver.run()
    finally:
        for task in helpers:
            task.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
        pipe.counters(receiver.counters)


def main() -> int:
    """Entry point of the receiver process (started by :class:`edge_agent.receiver_host.ReceiverHost`).

    SIGTERM and SIGINT are ignored: the agent owns this process's life (stdin's end asks for a clean stop,
    after the agent's own checkpoint needs). systemd's stop signals every process of the unit and a terminal's
    Ctrl-C the whole process group; dying there would leave what it took unacknowledged and make the agent
    start it again while stopping."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints go to stderr, never into the protocol
    stdin = open(0, "rb", buffering=0, closefd=False)  # noqa: SIM115 (lives as long as the process); unbuffered: what follows the settings stays in the pipe
    first = bytearray()
    while not first.endswith(b"\n"):
        byte = stdin.read(1)
        if not byte:
            return 1  # the agent went away before sending the settings
        first += byte
    settings = ReceiverSettings.from_json(bytes(first))
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    directory = Path(settings.directory)
    directory.mkdir(parents=True, exist_ok=True)
    lock = (directory / "receiver.lock").open("w")
    fcntl.flock(lock, fcntl.LOCK_EX)  # one writer: a predecessor still draining finishes first
    asyncio.run(_main(settings, out, stdin))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
