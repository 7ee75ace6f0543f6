"""Many feature records of one device in one message: ``features_batch`` (docs/wire/SPEC.md §3, "Batches").

Why: Python's per-message cost in MQTT clients dominates at high sample rates, so a gateway that holds a
window of records sends them as stacked arrays, one raw buffer per modality (``[count, ...record shape]``),
and a receiver checks each modality in one numpy operation instead of one per record.

Body: ``{"device": str, "sample": uint, "count": uint, "modalities": {name: array}, "labels"?: array,
"times"?: array}`` or with ``"samples": array`` (explicit ids) instead of ``"sample"`` (the first id, the
others following it by one). Every record of a batch carries the same modalities, shapes and dtypes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from broker.compat import slotted_dataclass
from broker.errors import ArrayFormatError, DecodeError, OversizeError, UnknownModalityError
from broker.wire.arrays import as_ndarray, decode_array, encode_array, numpy
from broker.wire.device import FeatureRecord
from broker.wire.fields import body_map, check_modality, get_int, get_map, get_str

if TYPE_CHECKING:
    import numpy as np

MAX_BATCH_RECORDS = 4096
"""Most records one ``features_batch`` may carry (receivers refuse more: ``OversizeError``)."""
MAX_BATCH_BYTES = 16 * 1024 * 1024
"""Most bytes of array data (modalities, labels, ids, times together) one batch may carry."""
MAX_SAMPLE_ID = (1 << 64) - 1
_INT_KINDS = frozenset("iu")


@slotted_dataclass()
class FeatureBatch:
    """``count`` records of one device as stacked arrays: ``modalities[name][i]`` is record ``i``'s array.

    ``samples`` is None when the ids are consecutive from ``first``; ``labels`` None when no record is
    labelled (a batch is labelled all or nothing); ``times`` optional per-record Unix milliseconds.
    """

    device: str
    first: int
    count: int
    modalities: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    samples: np.ndarray | None = None
    times: np.ndarray | None = None

    def sample_ids(self) -> np.ndarray:
        """Every record's sample id, in order (uint64)."""
        np = numpy()
        if self.samples is not None:
            return self.samples.astype(np.uint64)
        return np.arange(self.count, dtype=np.uint64) + np.uint64(self.first)

    def records(self) -> list[FeatureRecord]:
        """The batch as single records (views into the stacked arrays): what a batch means, one by one."""
        ids = self.sample_ids().tolist()
        labels = None if self.labels is None else self.labels.tolist()
        return [FeatureRecord(self.device, ids[i], {k: v[i] for k, v in self.modalities.items()},
                              label=None if labels is None else labels[i]) for i in range(self.count)]

    @classmethod
    def stack(cls, records: Sequence[FeatureRecord], *, times: Sequence[int] | None = None) -> FeatureBatch:
        """Stack records that carry the same modalities, shapes and dtypes (``ValueError`` otherwise).

        A modality may be a numpy array or a buffer :func:`broker.wire.arrays.encode_array` takes."""
        np = numpy()
        if not records:
            raise ValueError("a batch needs at least one record")
        head = records[0]
        names = list(head.modalities)
        labelled = head.label is not None
        for r in records:
            if r.device != head.device or r.modalities.keys() != head.modalities.keys():
                raise ValueError("records of one batch need the same device and modalities")
            if (r.label is not None) != labelled:
                raise ValueError("a batch is labelled all or nothing")
        try:
            arrays = {n: [as_ndarray(r.modalities[n]) for r in records] for n in names}
            mods = {n: np.stack(arrays[n]) for n in names}
        except ValueError as exc:
            raise ValueError(f"records of one batch need the same shapes: {exc}") from None
        for n in names:
            if any(a.dtype != mods[n].dtype for a in arrays[n]):
                raise ValueError(f"modality {n!r}: records of one batch need the same dtype")
        ids = [int(r.sample) for r in records]
        first = ids[0]
        consecutive = ids == list(range(first, first + len(ids)))
        return cls(
            device=head.device, first=first, count=len(records), modalities=mods,
            labels=np.array([r.label for r in records], dtype="<i4") if labelled else None,
            samples=None if consecutive else np.array(ids, dtype="<u8"),
            times=None if times is None else np.array(times, dtype="<u8"),
        )

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"device": self.device}
        if self.samples is None:
            body["sample"] = int(self.first)
        body["count"] = int(self.count)
        if self.samples is not None:
            body["samples"] = encode_array(self.samples)
        body["modalities"] = {check_modality(k): encode_array(v) for k, v in self.modalities.items()}
        if self.labels is not None:
            body["labels"] = encode_array(self.labels)
        if self.times is not None:
            body["times"] = encode_array(self.times)
        return body

    @classmethod
    def from_body(
        cls,
        body: Any,
        *,
        max_records: int = MAX_BATCH_RECORDS,
        max_bytes: int = MAX_BATCH_BYTES,
        max_record_bytes: int | None = None,
        allowed_modalities: frozenset[str] | set[str] | None = None,
    ) -> FeatureBatch:
        """Decode and check the structure: every stacked array is ``[count, ...]``, ids and labels are ints.

        ``max_record_bytes`` bounds one record's slice of a modality (a single record's ``max_array_bytes``).
        """
        b = body_map(body, "features_batch")
        device = get_str(b, "device")
        count = get_int(b, "count")
        assert count is not None
        if not 1 <= count <= max_records:
            raise OversizeError(f"a batch carries 1 to {max_records} records, this one says {count}")
        mods = get_map(b, "modalities")
        if not mods:
            raise UnknownModalityError("a feature batch needs at least one modality")
        total = 0
        arrays: dict[str, np.ndarray] = {}
        for name, obj in mods.items():
            array = decode_array(obj, max_bytes=max_bytes)
            _check_leading(array, count, f"modality {name!r}")
            if max_record_bytes is not None and array.nbytes // count > max_record_bytes:
                raise OversizeError(f"modality {name!r}: {array.nbytes // count} bytes per record exceed "
                                    f"the limit of {max_record_bytes}")
            total += array.nbytes
            arrays[check_modality(name, allowed_modalities)] = array
        labels = _int_column(b, "labels", count)
        times = _int_column(b, "times", count)
        samples = _int_column(b, "samples", count)
        for extra in (labels, times, samples):
            total += 0 if extra is None else extra.nbytes
        if total > max_bytes:
            raise OversizeError(f"batch of {total} array bytes exceeds the limit of {max_bytes}")
        if (samples is None) == ("sample" not in b or b["sample"] is None):
            raise DecodeError("a batch gives its sample ids as exactly one of 'sample' (first) or 'samples'")
        first = 0
        if samples is None:
            first = get_int(b, "sample") or 0
            if first + count - 1 > MAX_SAMPLE_ID:
                raise DecodeError(f"sample ids {first}..{first + count - 1} exceed 2^64-1")
        else:
            first = int(samples[0])
        return cls(device=device, first=first, count=count, modalities=arrays,  # type: ignore[arg-type]
                   labels=labels, samples=samples, times=times)


def _check_leading(array: np.ndarray, count: int, what: str) -> None:
    if array.ndim < 1 or array.shape[0] != count:
        raise ArrayFormatError(f"{what}: stacked shape {list(array.shape)} does not start with count {count}")


def _int_column(b: dict[str, Any], key: str, count: int) -> np.ndarray | None:
    """An optional ``[count]`` array of non-negative integers (labels, ids, times)."""
    obj = b.get(key)
    if obj is None:
        return None
    array = decode_array(obj)
    if array.ndim != 1:
        raise ArrayFormatError(f"{key}: must be one-dimensional, got shape {list(array.shape)}")
    _check_leading(array, count, key)
    if array.dtype.kind not in _INT_KINDS:
        raise ArrayFormatError(f"{key}: must be an integer array, got {array.dtype.str}")
    if array.dtype.kind == "i" and count and int(array.min()) < 0:
        raise DecodeError(f"{key}: values must be >= 0")
    return array


__all__ = ["MAX_BATCH_BYTES", "MAX_BATCH_RECORDS", "FeatureBatch"]
