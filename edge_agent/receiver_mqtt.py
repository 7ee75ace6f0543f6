"""The receiver process's MQTT fast paths: fewer syscalls, loop turns and objects per message than stock paho.

Why: profiled under ``bench/bench_edge.py``'s ingest load, the receiver process spent most of its time in
paho, not in logging: per QoS 1 message paho made 4 ``recv`` calls (command byte, length bytes, body),
one event-loop turn (``loop_read`` reads one packet per readiness event), an ``MQTTMessage`` plus, on
MQTT 5, a ``Properties`` object that decodes into about 40 attribute checks, and one ``send`` per PUBACK.
:func:`install` replaces three methods of one paho client instance (aiomqtt makes a fresh one per
connection), leaving paho's protocol state machine in charge:

* reads go through a 64 KiB buffer, and one readiness event reads every packet that buffer holds (the
  broker's in-flight window bounds how many), so the loop never sleeps on data already read;
* a QoS 1 PUBLISH (the receiver's only kind) becomes a slotted :class:`Received`; QoS 0/2, a topic alias
  or a topic that is not UTF-8 go through paho's own handler, unchanged;
* PUBACKs acknowledged in one loop turn leave as one write, in the order they were given (MQTT 3.1.1
  wants arrival order); :func:`flush_acks` sends them at once (a clean stop, before DISCONNECT).

The durability contract does not change: a PUBACK is still only built when :class:`~edge_agent.acks.DurableAcks`
acknowledges, after the log commit that holds the message.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

READ_BYTES = 64 * 1024
"""Bytes asked of the socket per ``recv`` (one call usually holds dozens of 1 KiB records)."""
MAX_PACKETS_PER_TURN = 4096
"""Packets one readiness event handles before yielding to the loop (the rest: a later turn of the loop)."""

_PUBACK = struct.Struct("!BBH")
_PUBACK_CMD = 0x40
_PAHO_INTERNALS = ("_sock_recv", "_handle_publish", "_in_packet", "_packet_queue", "_manual_ack", "_protocol",
                   "_userdata", "_sock")
"""What :func:`install` relies on (paho-mqtt 2.1/2.2); a paho without them keeps its stock paths."""


class Received:
    """A QoS 1 message as the receiver needs it (what :class:`~edge_agent.acks.Ackable` and the log read)."""

    __slots__ = ("mid", "payload", "topic")
    qos = 1
    retain = False

    def __init__(self, topic: str, payload: bytes, mid: int) -> None:
        self.topic = topic
        self.payload = payload
        self.mid = mid


class RetainedReceived(Received):
    __slots__ = ()
    retain = True


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """MQTT's variable byte integer at ``pos``: (value, position after it)."""
    value, shift = 0, 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80 or shift >= 21:
            return value, pos
        shift += 7


def install(pc: mqtt.Client, on_message: Callable[[Any, Any, Any], None],
            loop: asyncio.AbstractEventLoop) -> None:
    """Put the fast paths on paho client ``pc``: ``on_message(pc, userdata, Received)`` gets QoS 1 messages."""
    if not all(hasattr(pc, name) for name in _PAHO_INTERNALS):
        return
    v5 = pc._protocol == mqtt.MQTTv5
    stock_recv, stock_publish, stock_ack, stock_read = pc._sock_recv, pc._handle_publish, pc.ack, pc.loop_read
    buf = bytearray()
    state: dict[str, Any] = {"sock": None, "acks": bytearray(), "scheduled": False, "reading": False}

    def sock_recv(bufsize: int) -> bytes:
        if state["sock"] is not pc._sock:  # a new connection: what was buffered belongs to the old one
            state["sock"] = pc._sock
            del buf[:]
        if not buf:
            data = stock_recv(READ_BYTES)  # raises BlockingIOError when nothing is there (paho: "again")
            if len(data) <= bufsize:
                return data
            buf.extend(data)
        out = bytes(buf[:bufsize])
        del buf[:bufsize]
        return out

    def loop_read(max_packets: int = 1) -> Any:
        rc = mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
        for _ in range(MAX_PACKETS_PER_TURN):
            if pc._sock is None:
                return mqtt.MQTTErrorCode.MQTT_ERR_NO_CONN
            rc = stock_read(1)
            if rc != mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS or not buf:
                return rc  # an error, or nothing buffered: the socket's readiness calls again
        if not state["reading"]:  # the buffer still holds packets, which the socket will not signal again
            state["reading"] = True
            loop.call_soon(read_rest)
        return rc

    def read_rest() -> None:
        state["reading"] = False
        if pc._sock is not None and buf:
            pc.loop_read()

    def handle_publish() -> Any:
        header = pc._in_packet["command"]
        if header & 0x06 != 0x02:  # not QoS 1
            return stock_publish()
        packet = pc._in_packet["packet"]
        try:
            tlen = (packet[0] << 8) | packet[1]
            pos = 2 + tlen
            topic = packet[2:pos].decode()
            mid = (packet[pos] << 8) | packet[pos + 1]
            pos += 2
            if v5:
                length, pos = _varint(packet, pos)
                pos += length
        except (IndexError, UnicodeDecodeError):  # malformed or not UTF-8: paho's handler refuses it its way
            return stock_publish()
        if not tlen or pos > len(packet):  # a topic alias (paho's business), or properties beyond the packet
            return stock_publish()
        cls = RetainedReceived if header & 0x01 else Received
        on_message(pc, pc._userdata, cls(topic, packet[pos:], mid))
        return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS

    def ack(mid: int, qos: int) -> Any:
        if qos != 1 or not pc._manual_ack:
            return stock_ack(mid, qos)
        state["acks"] += _PUBACK.pack(_PUBACK_CMD, 2, mid)
        if not state["scheduled"]:
            state["scheduled"] = True
            loop.call_soon(flush)
        return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS

    def flush() -> None:
        state["scheduled"] = False
        data = state["acks"]
        if data:
            state["acks"] = bytearray()
            pc._packet_queue(_PUBACK_CMD, bytes(data), 0, 0)

    pc._sock_recv = sock_recv
    pc.loop_read = loop_read
    pc._handle_publish = handle_publish
    pc.ack = ack
    pc._megace_flush_acks = flush


def flush_acks(pc: mqtt.Client) -> None:
    """Queue the PUBACKs gathered so far now (before a DISCONNECT), where :func:`install` put the fast paths."""
    flush = getattr(pc, "_megace_flush_acks", None)
    if flush is not None:
        flush()
