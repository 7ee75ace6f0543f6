"""What the edge sends down, built and signed in one place: envelopes under the edge's own increasing seq.

Kept out of :mod:`edge_agent.core` (which decides *what* to send) because the seq bookkeeping has a
durability rule of its own: every seq handed out lies under a bound persisted first, so seqs keep
increasing across restarts, as the wire spec promises devices. The service and inference workers
publish what this builds (:mod:`edge_agent.downlinks`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from broker import topics
from broker.chunking import frames
from broker.signing import Signer
from broker.wire import Kind, encode_envelope

DOWN_SEQ_BLOCK = 10_000
"""Downlink seqs reserved (persisted) at a time: one small fsync'd write per block."""


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message to publish."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    done: Callable[[], None] | None = field(default=None, compare=False)
    """Called once the broker acknowledged (or the queue dropped) this message: an inference request's
    own acknowledgement waits for its answer (see :mod:`edge_agent.acks`)."""


class DownlinkWriter:
    """Envelopes from one edge (or one of its inference workers) to its site's devices.

    Args:
        site: The site whose device topics the messages go to.
        sender: The envelope's sender (the edge id).
        signer: Signs each whole envelope (None: unsigned); an inference worker swaps in its own.
        max_packet: The largest MQTT packet :meth:`frames` builds by default.
    """

    def __init__(self, site: str, sender: str, signer: Signer | None, max_packet: int) -> None:
        self.site, self.sender, self.signer, self.max_packet = site, sender, signer, max_packet
        self.seq = 0
        self._reserved = 0
        self._reserve: Callable[[int], None] | None = None

    def resume(self, reserved: int, reserve: Callable[[int], None]) -> None:
        """Continue after ``reserved`` (the last bound persisted), persisting each new bound through
        ``reserve`` before any seq under it is used; a restart costs a gap of at most one block."""
        self.seq = self._reserved = max(self.seq, int(reserved))
        self._reserve = reserve

    def signed(self, topic: str, kind: Kind, message: Any) -> Outgoing:
        """``message`` under the next seq, signed when this writer signs."""
        self.seq += 1
        if self._reserve is not None and self.seq > self._reserved:
            self._reserved = self.seq + DOWN_SEQ_BLOCK - 1
            self._reserve(self._reserved)
        payload = encode_envelope(kind, self.sender, self.seq, message.to_body())
        return Outgoing(topic, payload if self.signer is None else self.signer.sign(payload))

    def device(self, device: str, kind: Kind, message: Any) -> Outgoing:
        """A downlink to one device, on its ``down/<kind>`` topic."""
        return self.signed(topics.device_down(self.site, device, topics.Downlink(kind.value)), kind, message)

    def frames(self, device: str, kind: Kind, message: Any, max_packet: int | None = None) -> list[Outgoing]:
        """:meth:`device` for a message that may not fit one packet (a model): the (signed) whole, chunked as
        SPEC §4 says; every chunk carries the envelope's seq and the device verifies after reassembly."""
        whole = self.device(device, kind, message)
        limit = self.max_packet if max_packet is None else max_packet
        return [Outgoing(t, p) for t, p in frames(whole.topic, whole.payload, sender=self.sender, seq=self.seq,
                                                  max_packet=limit)]


__all__ = ["DOWN_SEQ_BLOCK", "DownlinkWriter", "Outgoing"]
