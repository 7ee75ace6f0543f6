"""Chunking: payloads above a packet budget travel as numbered chunks and are reassembled.

Many brokers cap packets at 1 MB (EMQX) or 128 KB (AWS IoT Core), so anything
larger than ``DEFAULT_MAX_PACKET`` is split. Chunk ``i`` of a transfer meant for
``topic`` goes to ``topic/chunk/i`` as an envelope of kind ``chunk`` whose body is
``{"transfer": 16 bytes, "index", "count", "size", "sha256": 32 bytes, "data"}``.
Reassembly is out-of-order tolerant, bounded in memory and transfers, times out
stale transfers, and verifies the sha256 of the whole.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import field
from typing import Any

from broker import topics
from broker.compat import slotted_dataclass
from broker.errors import ChunkError, ChunkHashError, ChunkLimitError, OversizeError
from broker.wire.envelope import DEFAULT_MAX_PAYLOAD, Kind, encode_envelope
from broker.wire.fields import body_map, get_int

DEFAULT_MAX_PACKET = 256 * 1024
"""Largest MQTT payload megace publishes unchunked: well under the common 1 MB broker cap."""
_CHUNK_OVERHEAD = 256  # envelope + chunk header bytes, generously
MAX_CHUNKS = 1 << 16


def frames(
    topic: str,
    payload: bytes,
    *,
    sender: str,
    seq: int = 0,
    max_packet: int = DEFAULT_MAX_PACKET,
    ts_ms: int | None = None,
) -> list[tuple[str, bytes]]:
    """``[(topic, payload)]`` if it fits in one packet, else the chunk messages that carry it."""
    if len(payload) <= max_packet:
        return [(topic, payload)]
    per_chunk = max_packet - _CHUNK_OVERHEAD
    if per_chunk <= 0:
        raise ValueError(f"max_packet {max_packet} is too small to carry chunks")
    count = -(-len(payload) // per_chunk)
    if count > MAX_CHUNKS:
        raise OversizeError(f"{len(payload)} bytes would need {count} chunks (max {MAX_CHUNKS})")
    transfer = os.urandom(16)
    digest = hashlib.sha256(payload).digest()
    view = memoryview(payload)
    out = []
    for i in range(count):
        body = {
            "transfer": transfer,
            "index": i,
            "count": count,
            "size": len(payload),
            "sha256": digest,
            "data": view[i * per_chunk : (i + 1) * per_chunk],
        }
        out.append((topics.chunk(topic, i), encode_envelope(Kind.CHUNK, sender, seq, body, ts_ms=ts_ms)))
    return out


@slotted_dataclass()
class _Transfer:
    transfer: bytes
    count: int
    size: int
    sha256: bytes
    sender: str = ""
    parts: dict[int, bytes] = field(default_factory=dict)
    received: int = 0
    last: float = 0.0


class Reassembler:
    """Collects chunks per (key, transfer id) and returns the whole payload once complete.

    Memory is bounded twice: globally (``max_bytes`` announced bytes, ``max_transfers`` partial
    transfers) and per sender (``max_sender_bytes``, ``max_sender_transfers``), so one sender cannot
    starve the others: four chunks announcing 64 MiB each used to hold a 256 MiB budget for a whole
    timeout. A sender over its share loses its *own* least recently active partial transfers (counted
    in :attr:`evicted`: a crashed sender's stale half-transfer must not block its resend); only the
    global bounds refuse (:class:`ChunkLimitError`), and a refusal changes nothing.
    """

    def __init__(
        self,
        *,
        max_transfers: int = 32,
        max_bytes: int = DEFAULT_MAX_PAYLOAD,
        max_transfer_bytes: int = DEFAULT_MAX_PAYLOAD,
        timeout_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        max_sender_bytes: int | None = None,
        max_sender_transfers: int | None = None,
    ) -> None:
        """Per-sender shares default to a quarter of the global bounds, never less than one whole transfer."""
        self.max_transfers = max_transfers
        self.max_bytes = max_bytes
        self.max_transfer_bytes = max_transfer_bytes
        self.timeout_s = timeout_s
        share = min(max_bytes, max(max_transfer_bytes, max_bytes // 4))
        self.max_sender_bytes = max_sender_bytes if max_sender_bytes is not None else share
        self.max_sender_transfers = (
            max_sender_transfers if max_sender_transfers is not None else max(1, max_transfers // 4)
        )
        self._clock = clock
        self._open: dict[tuple[str, bytes], _Transfer] = {}
        self.expired = 0
        self.completed = 0
        self.evicted = 0

    @property
    def reserved_bytes(self) -> int:
        """Bytes promised to transfers in progress (announced sizes): the memory bound."""
        return sum(t.size for t in self._open.values())

    @property
    def open_transfers(self) -> int:
        return len(self._open)

    def sender_bytes(self, sender: str) -> int:
        """Bytes reserved by ``sender``'s partial transfers."""
        return sum(t.size for t in self._open.values() if t.sender == sender)

    def expire(self) -> int:
        """Drop transfers idle for longer than the timeout; return how many were dropped."""
        now = self._clock()
        stale = [k for k, t in self._open.items() if now - t.last > self.timeout_s]
        for k in stale:
            del self._open[k]
        self.expired += len(stale)
        return len(stale)

    def feed(self, key: str, body: Any, *, sender: str | None = None) -> bytes | None:
        """Add one chunk body; return the verified payload when its transfer is complete.

        ``sender`` is who is charged for the transfer's memory (default: ``key``); the inbox passes the
        publisher identity the topic names, which a broker's ACL vouches for (an envelope's sender does not).
        """
        self.expire()
        who = key if sender is None else sender
        b = body_map(body, "chunk")
        transfer, digest, data = b.get("transfer"), b.get("sha256"), b.get("data")
        if not isinstance(transfer, bytes) or len(transfer) != 16:
            raise ChunkError("chunk transfer id must be 16 bytes")
        if not isinstance(digest, bytes) or len(digest) != 32:
            raise ChunkError("chunk sha256 must be 32 bytes")
        if not isinstance(data, bytes):
            raise ChunkError("chunk data must be binary")
        try:
            index, count, size = get_int(b, "index"), get_int(b, "count", minimum=1), get_int(b, "size")
        except ValueError as exc:
            raise ChunkError(str(exc)) from None
        assert index is not None and count is not None and size is not None
        if count > MAX_CHUNKS or index >= count:
            raise ChunkError(f"chunk index {index} / count {count} out of range")
        if size > self.max_transfer_bytes:
            raise OversizeError(f"transfer of {size} bytes exceeds the limit of {self.max_transfer_bytes}")
        slot = (key, transfer)
        t = self._open.get(slot)
        if t is None:
            t = self._open[slot] = self._admit(who, _Transfer(transfer, count, size, digest, who))
        elif (t.count, t.size, t.sha256) != (count, size, digest):
            raise ChunkError("chunk disagrees with earlier chunks of its transfer on count, size or sha256")
        t.last = self._clock()
        if index in t.parts:
            if t.parts[index] != data:
                raise ChunkError(f"chunk {index} arrived twice with different data")
            return None
        if t.received + len(data) > size:
            del self._open[slot]
            raise ChunkError("chunks carry more bytes than the transfer announced")
        t.parts[index] = data
        t.received += len(data)
        if len(t.parts) < count:
            return None
        del self._open[slot]
        payload = b"".join(t.parts[i] for i in range(count))
        if len(payload) != size:
            raise ChunkError(f"reassembled {len(payload)} bytes, transfer announced {size}")
        if hashlib.sha256(payload).digest() != digest:
            raise ChunkHashError("reassembled payload does not match its sha256")
        self.completed += 1
        return payload

    def _admit(self, sender: str, new: _Transfer) -> _Transfer:
        """Make room for a new transfer: evict the sender's own oldest partials over its share, then check
        the global bounds. Nothing is evicted unless the new transfer is then admitted."""
        if new.size > self.max_bytes:
            raise ChunkLimitError(f"transfer of {new.size} bytes would exceed the reassembly budget")
        if new.size > self.max_sender_bytes:
            raise ChunkLimitError(f"transfer of {new.size} bytes exceeds the per-sender budget of "
                                  f"{self.max_sender_bytes}")
        own = sorted(((t.last, k) for k, t in self._open.items() if t.sender == sender), key=lambda x: x[0])
        own_bytes = sum(self._open[k].size for _, k in own)
        victims: list[tuple[str, bytes]] = []
        while own and (len(own) - len(victims) >= self.max_sender_transfers
                       or own_bytes + new.size > self.max_sender_bytes):
            _, k = own[len(victims)]
            victims.append(k)
            own_bytes -= self._open[k].size
            if len(victims) == len(own):
                break
        freed = sum(self._open[k].size for k in victims)
        if len(self._open) - len(victims) >= self.max_transfers:
            raise ChunkLimitError(f"too many transfers in progress ({self.max_transfers})")
        if self.reserved_bytes - freed + new.size > self.max_bytes:
            raise ChunkLimitError(f"transfer of {new.size} bytes would exceed the reassembly budget")
        for k in victims:
            del self._open[k]
        self.evicted += len(victims)
        return new
