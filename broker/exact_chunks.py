"""Subscribe to a retained topic's chunk topics by their exact names, never through ``{topic}/chunk/+``.

Why: RabbitMQ's MQTT plugin never delivers a retained message through a ``+``/``#`` filter (the
subscription is acknowledged and stays silent; see :mod:`broker.capabilities`). An edge that subscribed to
``.../global/chunk/+`` after the cloud published a chunked global therefore never saw it. Exact names are
delivered their retained message by every broker. How many names: each chunk says its transfer's
``count``, so a receiver starts with ``initial`` names and, when a chunk announces more, subscribes to the
rest (their retained chunks then arrive; ones published later arrive live). Live messages are delivered
the same way, so one set of exact filters replaces the wildcard; subscribing both would deliver chunks twice
on brokers that honour overlapping subscriptions separately.
"""

from __future__ import annotations

from collections.abc import Iterable

from broker import topics
from broker.errors import WireError
from broker.wire.envelope import Kind, decode_envelope

INITIAL_CHUNKS = 16
"""Chunk names subscribed up front per topic: 4 MiB at the default 256 KiB packet budget."""
MAX_EXACT_CHUNKS = 4096
"""At most this many exact chunk names per topic (1 GiB at 256 KiB each): a chunk claiming a larger count
does not make the receiver subscribe to tens of thousands of topics."""


class ExactChunks:
    """The exact filters for ``bases`` (each topic and its chunk names) and their growth as counts are seen.

    Args:
        bases: Retained topics read whole or chunked (the global, a site's feedback).
        initial: Chunk names per topic subscribed before any chunk was seen.
        limit: Most chunk names per topic (:data:`MAX_EXACT_CHUNKS`).
    """

    def __init__(self, bases: Iterable[str], *, initial: int = INITIAL_CHUNKS, limit: int = MAX_EXACT_CHUNKS) -> None:
        self.limit = limit
        self._count = {base: min(initial, limit) for base in bases}
        self._prefixes = {f"{base}/chunk/": base for base in self._count}
        self.clipped = 0
        """Chunks that announced more than ``limit`` chunks (their tail is never subscribed)."""

    def filters(self) -> list[str]:
        """Every exact filter to subscribe now (on each (re)connect): the bases and their known chunk names."""
        out: list[str] = []
        for base, n in self._count.items():
            out.append(base)
            out.extend(topics.chunk(base, i) for i in range(n))
        return out

    def covers(self, topic: str) -> bool:
        """Whether ``topic`` is one of the bases' chunk topics (cheap: a prefix test, no decoding)."""
        head, sep, _ = topic.rpartition("/chunk/")
        return bool(sep) and f"{head}/chunk/" in self._prefixes

    def observe(self, topic: str, payload: bytes) -> list[str]:
        """The new exact chunk filters a received chunk calls for (empty: none, or not one of ours).

        A payload that is not a readable chunk adds nothing; the receiver's inbox rejects and counts it."""
        if not payload or not self.covers(topic):
            return []
        base = self._prefixes[topic[: topic.rindex("/chunk/") + len("/chunk/")]]
        try:
            body = decode_envelope(payload, expect=Kind.CHUNK).body
        except WireError:
            return []
        count = body.get("count") if isinstance(body, dict) else None
        if not isinstance(count, int) or isinstance(count, bool) or count <= self._count[base]:
            return []
        if count > self.limit:
            self.clipped += 1
            count = self.limit
        new = [topics.chunk(base, i) for i in range(self._count[base], count)]
        self._count[base] = count
        return new
