"""The receiving half of the bus contract: topic + payload in, checked envelope out.

Every megace receiver (device SDK, edge, cloud, dashboards) feeds raw MQTT
messages through an :class:`Inbox`, which parses the topic, reassembles chunks
and decodes the envelope. Anything wrong raises a :class:`broker.errors.WireError`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from broker import topics
from broker.chunking import Reassembler
from broker.errors import ChunkError, TopicError
from broker.signing import unsigned
from broker.wire.envelope import DEFAULT_MAX_PAYLOAD, Envelope, Kind, decode_envelope

Opener = Callable[[topics.Parsed, bytes], bytes]
"""Turns a whole received message into envelope bytes (verifying a signature), or raises a WireError."""


class Inbox:
    """Stateful decoder for one receiver: owns the chunk reassembly buffers."""

    def __init__(
        self,
        reassembler: Reassembler | None = None,
        *,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        channels: frozenset[topics.Channel] | None = None,
        opener: Opener | None = None,
    ) -> None:
        """``channels``: the topic channels this receiver handles; messages on others are counted in
        :attr:`foreign` and dropped undecoded (e.g. JSON status that a broker routed by mistake).

        ``opener``: called with the topic and each whole message (after chunk reassembly, before the
        envelope is decoded); returns the envelope bytes or raises a ``WireError``. This is where a
        receiver checks signatures (:mod:`broker.signing`); without one, a signed message's envelope
        is taken unverified."""
        self.channels = channels
        self.opener = opener
        self.foreign = 0
        self.reassembler = reassembler or Reassembler(max_transfer_bytes=max_payload)
        self.max_payload = max_payload

    def accept(self, topic: str, payload: bytes) -> tuple[topics.Parsed, Envelope] | None:
        """Decode one MQTT message; ``None`` means nothing to act on yet.

        That is a chunk whose transfer is not complete, or an empty payload: the MQTT way to clear a
        retained message (publishers clear stale retained chunks), never a megace message.
        """
        try:
            parsed = topics.parse(topic)
        except TopicError:
            raise
        except (ValueError, TypeError) as exc:  # e.g. ".../chunk/²": str.isdigit() accepts it, int() does not
            raise TopicError(f"not a megace/v1 topic: {topic!r} ({type(exc).__name__})") from None
        if self.channels is not None and parsed.channel not in self.channels:
            self.foreign += 1
            return None
        if not payload:
            return None
        if parsed.chunk_index is None:
            return parsed, decode_envelope(self._open(parsed, payload), max_size=self.max_payload)
        env = decode_envelope(payload, expect=Kind.CHUNK, max_size=self.max_payload)
        if isinstance(env.body, dict) and env.body.get("index") != parsed.chunk_index:
            raise ChunkError(f"chunk body index {env.body.get('index')!r} != topic index {parsed.chunk_index}")
        base = replace(parsed, chunk_index=None)
        whole = self.reassembler.feed(f"{base.base}|{env.sender}", env.body, sender=publisher(base))
        if whole is None:
            return None
        inner = decode_envelope(self._open(base, whole), max_size=self.max_payload)
        if inner.kind is Kind.CHUNK:
            raise ChunkError("a chunked transfer may not contain another chunk")
        return base, inner


    def _open(self, parsed: topics.Parsed, payload: bytes) -> bytes:
        if self.opener is not None:
            return self.opener(parsed, payload)
        return unsigned(payload)


def publisher(parsed: topics.Parsed) -> str:
    """Who may publish on ``parsed``'s topic (what a broker ACL ties to credentials): the identity that
    reassembly memory is charged to. The envelope's own sender field is self-declared and is not used."""
    c = parsed.channel
    if c is topics.Channel.DEVICE_UP:
        return f"device/{parsed.site}/{parsed.device}"
    if c in (topics.Channel.DEVICE_DOWN, topics.Channel.SITE_REQUEST):
        return f"edge/{parsed.site}"
    if c is topics.Channel.ADAPTER_UP:
        return f"site/{parsed.site}"
    if c in (topics.Channel.GLOBAL_DOWN, topics.Channel.SITE_FEEDBACK):
        return "cloud"
    return f"{c.value}/{parsed.role}/{parsed.ident}"
