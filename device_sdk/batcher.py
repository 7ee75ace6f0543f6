"""The SDK's record accumulator: feature records lingered into ``features_batch`` messages.

Why: one MQTT message per record costs more in paho and in the edge's client than the record itself, so
(like a Kafka producer's ``linger.ms`` and ``batch.size``, or aiokafka's accumulator) records of the same
layout wait up to ``linger_ms`` and go out together as stacked arrays, once ``batch_max`` records or
``batch_bytes`` bytes of arrays are gathered, or when the linger time ran out. A record that does not fit
the open batch (other modalities, shapes, dtypes, labelled vs not, quality indicators) closes it first, so
records still leave in the order they were published. Records with quality indicators are
not batched (a batch has no per-record quality): the client sends them alone. Not thread-safe: the client
calls it under its lock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from broker.wire import MAX_BATCH_RECORDS, FeatureBatch, FeatureRecord
from broker.wire.arrays import array_layout

Signature = tuple  # (labelled, (name, shape, dtype), ...)


def signature(record: FeatureRecord) -> Signature:
    """What records must share to be stacked: modality names, shapes and dtypes, and whether labelled."""
    parts: list[Any] = [record.label is not None]
    for name, array in record.modalities.items():
        shape, dtype, _ = array_layout(array)  # numpy arrays and plain buffers (array.array, memoryview)
        parts.append((name, shape, dtype))
    return tuple(parts)


class Batcher:
    """Open batch of one device's records; ``send(batch, seq)`` publishes a closed one.

    Args:
        send: Publishes a closed batch under the seq reserved when it opened (the client's ``_send``).
        reserve: Returns the next envelope seq (a batch takes its seq when its first record arrives, so
            ``publish`` can return it at once).
        linger_ms: How long the first record of a batch may wait for company.
        batch_max: Records per batch (at most ``MAX_BATCH_RECORDS``).
        batch_bytes: Array bytes per batch; a single record larger than this travels as a batch of one.
    """

    def __init__(self, send: Callable[[FeatureBatch, int], None], reserve: Callable[[], int], *,
                 linger_ms: float, batch_max: int, batch_bytes: int) -> None:
        if not 1 <= batch_max <= MAX_BATCH_RECORDS:
            raise ValueError(f"batch_max must be 1 to {MAX_BATCH_RECORDS}, got {batch_max}")
        self.send = send
        self.reserve = reserve
        self.linger_s = max(float(linger_ms), 0.0) / 1000.0
        self.batch_max = batch_max
        self.batch_bytes = max(int(batch_bytes), 1)
        self._records: list[FeatureRecord] = []
        self._signature: Signature | None = None
        self._bytes = 0
        self._seq = 0
        self._deadline = 0.0

    def __len__(self) -> int:
        return len(self._records)

    @property
    def deadline(self) -> float | None:
        """``time.monotonic()`` at which the open batch must go (None: no batch open)."""
        return self._deadline if self._records else None

    def add(self, record: FeatureRecord) -> int:
        """Queue ``record``; returns the seq of the envelope that will carry it."""
        sig = signature(record)
        size = sum(array_layout(a)[2] for a in record.modalities.values())
        if self._records and (sig != self._signature or self._bytes + size > self.batch_bytes):
            self.flush()
        if not self._records:
            self._signature, self._bytes = sig, 0
            self._seq = self.reserve()
            self._deadline = time.monotonic() + self.linger_s
        self._records.append(record)
        self._bytes += size
        seq = self._seq
        if len(self._records) >= self.batch_max or self._bytes >= self.batch_bytes:
            self.flush()
        return seq

    def due(self, now: float | None = None) -> bool:
        """Whether the open batch's linger time ran out."""
        return bool(self._records) and (time.monotonic() if now is None else now) >= self._deadline

    def flush(self) -> int | None:
        """Send the open batch now (if any); returns its seq."""
        if not self._records:
            return None
        records, seq = self._records, self._seq
        self._records, self._signature, self._bytes = [], None, 0
        self.send(FeatureBatch.stack(records), seq)
        return seq


__all__ = ["Batcher", "signature"]
