"""Bounded replay buffer of labelled multimodal samples.

Edge boxes have little memory and devices can flood them, so every device and
every modality has a cap on samples, and the buffer and every device a cap on
bytes (a count alone lets one device fill memory with its largest allowed
arrays); when a cap is hit the *oldest* matching sample is dropped (recent data
reflects the current distribution) and the drop is counted, so the service can
export how much data it is throwing away.
Thread-safe: the MQTT loop adds while a training thread takes snapshots.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

_F32 = np.dtype(np.float32)


@dataclass(frozen=True, slots=True)
class BufferedSample:
    """One stored sample; ``seq`` increases monotonically over the buffer's lifetime."""

    seq: int
    device_id: str
    modalities: dict[str, np.ndarray]
    label: int
    nbytes: int = -1
    """The arrays' bytes, computed once (the byte caps read it on every insert and eviction); -1: compute."""

    def __post_init__(self) -> None:
        if self.nbytes < 0:
            object.__setattr__(self, "nbytes", sum(a.nbytes for a in self.modalities.values()))

    @property
    def presence(self) -> tuple[str, ...]:
        return tuple(sorted(self.modalities))

    def as_sample(self) -> dict[str, Any]:
        """The collate format ``{"modalities": ..., "label": ...}``."""
        return {"modalities": self.modalities, "label": self.label}


class ReplayBuffer:
    """FIFO with per-device, per-modality and total caps on samples and bytes (``None`` = no cap)."""

    def __init__(
        self,
        *,
        max_total: int = 4096,
        max_per_device: int | None = 1024,
        max_per_modality: int | None = None,
        max_bytes: int | None = None,
        max_bytes_per_device: int | None = None,
    ) -> None:
        for cap in (max_total, max_per_device, max_per_modality, max_bytes, max_bytes_per_device):
            if cap is not None and cap < 1:
                raise ValueError("caps must be >= 1 or None")
        self.max_total = max_total
        self.max_per_device = max_per_device
        self.max_per_modality = max_per_modality
        self.max_bytes = max_bytes
        self.max_bytes_per_device = max_bytes_per_device
        self._bytes = 0
        self._device_bytes: Counter[str] = Counter()
        self._items: OrderedDict[int, BufferedSample] = OrderedDict()
        self._by_device: dict[str, deque[int]] = {}
        self._by_modality: dict[str, deque[int]] = {}
        self._device_count: Counter[str] = Counter()
        self._modality_count: Counter[str] = Counter()
        self._dropped: Counter[str] = Counter()
        self._next_seq = 0
        self._lock = threading.Lock()

    def add(self, device_id: str, modalities: Mapping[str, Any], label: int) -> BufferedSample:
        """Store a copy (float32) of the sample and evict what the caps require."""
        arrays = {
            name: value.copy() if type(value) is np.ndarray and value.dtype == _F32 else
            np.array(value, dtype=np.float32, copy=True)
            for name, value in modalities.items()
        }
        with self._lock:
            return self._insert(device_id, arrays, int(label))

    def add_many(self, device_id: str, stacked: Mapping[str, np.ndarray], labels: Any) -> int:
        """Store ``len(labels)`` samples given as stacked arrays (``stacked[name][i]`` is sample ``i``'s) at once.

        Why: a device batch arrives as one array per modality; it is converted to float32 in one copy per
        modality and each sample keeps a row view of that copy (a batch's memory is freed once its last row
        is evicted; eviction is oldest first, so at most the batch at each cap's boundary is held beyond it).
        One lock for the whole batch; caps and drops apply sample by sample as with :meth:`add`.
        Returns the number of samples stored.
        """
        copies = {name: np.array(value, dtype=np.float32, copy=True) for name, value in stacked.items()}
        label_list = [int(x) for x in np.asarray(labels).tolist()]
        names = list(copies)
        with self._lock:
            for i, label in enumerate(label_list):
                self._insert(device_id, {name: copies[name][i] for name in names}, label)
        return len(label_list)

    def _insert(self, device_id: str, arrays: dict[str, np.ndarray], label: int) -> BufferedSample:
        """Index one sample and enforce the caps (caller holds the lock)."""
        seq = self._next_seq
        nbytes = 0
        for array in arrays.values():
            nbytes += array.nbytes
        item = BufferedSample(seq, device_id, arrays, label, nbytes)
        self._next_seq = seq + 1
        self._items[seq] = item
        by_device = self._by_device.get(device_id)
        if by_device is None:
            by_device = self._by_device[device_id] = deque()
        by_device.append(seq)
        self._device_count[device_id] += 1
        self._bytes += nbytes
        self._device_bytes[device_id] += nbytes
        per_modality = self.max_per_modality is not None  # the modality index only serves that cap
        modality_count = self._modality_count
        for name in arrays:
            if per_modality:
                self._by_modality.setdefault(name, deque()).append(seq)
            modality_count[name] += 1
        self._enforce_caps(item)
        # entries evicted through another index (e.g. the total cap) are only skipped lazily when
        # a cap of this index is hit; drop stale heads here too so the indexes stay bounded
        items = self._items
        while by_device and by_device[0] not in items:
            by_device.popleft()
        if per_modality:
            for name in arrays:
                queue = self._by_modality[name]
                while queue and queue[0] not in items:
                    queue.popleft()
        return item

    def restore(self, items: list[BufferedSample]) -> None:
        """Refill an empty buffer from a checkpoint, keeping each sample's original ``seq``.

        Keeping seqs keeps the train / held-out split (``seq % holdout_every``) of
        every sample as it was, so a restart never moves held-out data into training.
        """
        with self._lock:
            if self._items:
                raise ValueError("restore needs an empty buffer")
            for item in sorted(items, key=lambda s: s.seq):
                self._items[item.seq] = item
                self._by_device.setdefault(item.device_id, deque()).append(item.seq)
                self._device_count[item.device_id] += 1
                self._bytes += item.nbytes
                self._device_bytes[item.device_id] += item.nbytes
                for name in item.presence:
                    if self.max_per_modality is not None:
                        self._by_modality.setdefault(name, deque()).append(item.seq)
                    self._modality_count[name] += 1
                self._next_seq = max(self._next_seq, item.seq + 1)
                self._enforce_caps(item)

    def _enforce_caps(self, item: BufferedSample) -> None:
        if self.max_per_device is not None:
            while self._device_count[item.device_id] > self.max_per_device:
                self._evict_oldest(self._by_device[item.device_id], f"device:{item.device_id}")
        if self.max_bytes_per_device is not None:
            while self._device_bytes[item.device_id] > self.max_bytes_per_device:
                self._evict_oldest(self._by_device[item.device_id], f"device_bytes:{item.device_id}")
        if self.max_per_modality is not None:
            for name in item.presence:
                while self._modality_count[name] > self.max_per_modality:
                    self._evict_oldest(self._by_modality[name], f"modality:{name}")
        items = self._items
        while len(items) > self.max_total:
            self._evict(next(iter(items)), "total")
        while self.max_bytes is not None and self._bytes > self.max_bytes:
            self._evict(next(iter(self._items)), "bytes")

    def _evict_oldest(self, queue: deque[int], reason: str) -> None:
        while queue[0] not in self._items:  # lazily skip entries evicted through another index
            queue.popleft()
        self._evict(queue[0], reason)

    def _evict(self, seq: int, reason: str) -> None:
        item = self._items.pop(seq)
        self._device_count[item.device_id] -= 1
        self._bytes -= item.nbytes
        self._device_bytes[item.device_id] -= item.nbytes
        modality_count = self._modality_count
        for name in item.modalities:
            modality_count[name] -= 1
        self._dropped[reason] += 1
        self._dropped["all"] += 1

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def snapshot(self) -> list[BufferedSample]:
        """Current samples, oldest first (items are immutable; safe to use without the lock)."""
        with self._lock:
            return list(self._items.values())

    @property
    def dropped(self) -> dict[str, int]:
        """Drops by reason plus ``all``.

        Reasons: ``device:<id>``, ``device_bytes:<id>``, ``modality:<m>``, ``total``, ``bytes``.
        """
        with self._lock:
            return dict(self._dropped)

    def counts(self) -> dict[str, Any]:
        """Occupancy for metrics: total, per device, per modality."""
        with self._lock:
            return {
                "total": len(self._items),
                "bytes": self._bytes,
                "devices": {k: v for k, v in self._device_count.items() if v},
                "modalities": {k: v for k, v in self._modality_count.items() if v},
            }
