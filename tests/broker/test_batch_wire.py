"""``features_batch`` on the wire: the SPEC's vector rebuilt by hand with msgpack, and the structural refusals."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import msgpack
import numpy as np
import pytest

from broker.errors import ArrayFormatError, DecodeError, OversizeError
from broker.errors import WireError as WireErrorBase
from broker.wire import FeatureBatch, FeatureRecord, Kind, decode_envelope, encode_envelope
from broker.wire.bodies import decode_body

DOCS = Path(__file__).parents[2] / "docs" / "wire"


def _spec_hex() -> str:
    spec = (DOCS / "SPEC.md").read_text()
    block = spec.split("Vector `features-batch`", 1)[1].split("```")[1]
    return "".join(block.split())


def test_the_spec_vector_is_the_msgpack_the_spec_describes() -> None:
    """Built from the spec's words with plain msgpack (not broker.wire), then compared with the codec and the docs."""
    data = struct.pack("<6f", 0.5, -1.0, 2.0, 1.0, 0.0, -2.0)
    body = {"device": "gw-7", "sample": 100, "count": 2,
            "modalities": {"accel": {"dtype": "<f4", "shape": [2, 1, 3], "data": data}},
            "labels": {"dtype": "<i4", "shape": [2], "data": struct.pack("<2i", 3, 1)}}
    env = {"v": 1, "k": "features_batch", "s": "gw-7", "n": 12, "t": 1_700_000_000_000,
           "ct": "application/vnd.megace.features_batch+msgpack", "b": body}
    by_hand = msgpack.packb(env, use_bin_type=True).hex()
    assert _spec_hex() == by_hand
    vectors = {v["name"]: v for v in json.loads((DOCS / "test_vectors.json").read_text())}
    assert vectors["features-batch"]["hex"] == by_hand
    batch = FeatureBatch("gw-7", 100, 2, {"accel": np.array([[[0.5, -1, 2]], [[1, 0, -2]]], "<f4")},
                         labels=np.array([3, 1], "<i4"))
    assert encode_envelope(Kind.FEATURES_BATCH, "gw-7", 12, batch.to_body(), ts_ms=1_700_000_000_000).hex() == by_hand


def test_stack_and_records_are_inverse_and_ids_may_be_explicit() -> None:
    recs = [FeatureRecord("d", s, {"x": np.full((2, 3), s, np.float32)}, label=s % 3) for s in (5, 9, 10)]
    batch = FeatureBatch.stack(recs, times=[1, 2, 3])
    assert batch.samples is not None and batch.modalities["x"].shape == (3, 2, 3)
    got = decode_body(decode_envelope(encode_envelope(Kind.FEATURES_BATCH, "d", 1, batch.to_body())))
    assert got.sample_ids().tolist() == [5, 9, 10] and got.times.tolist() == [1, 2, 3]
    for want, have in zip(recs, got.records(), strict=True):
        assert (have.sample, have.label) == (want.sample, want.label)
        np.testing.assert_array_equal(have.modalities["x"], want.modalities["x"])
    with pytest.raises(ValueError):
        FeatureBatch.stack([recs[0], FeatureRecord("d", 6, {"x": np.zeros((3, 3), np.float32)}, label=0)])


def _body(**change) -> dict:
    body = FeatureBatch("d", 0, 4, {"x": np.zeros((4, 3), np.float32)}).to_body()
    body.update(change)
    return body


@pytest.mark.parametrize(("body", "error"), [
    (_body(count=5), ArrayFormatError),  # no labels: only the modality's first dimension can tell
    (_body(count=0), OversizeError),
    (_body(count=4097), OversizeError),
    (_body(modalities={"x": {"dtype": "<f4", "shape": [3], "data": bytes(12)}}), ArrayFormatError),
    (_body(sample=None), DecodeError),
    (_body(samples={"dtype": "<i4", "shape": [4], "data": bytes(16)}), DecodeError),
    (_body(labels={"dtype": "<i4", "shape": [4, 1], "data": bytes(16)}), ArrayFormatError),
    (_body(labels={"dtype": "<i4", "shape": [4], "data": b"\xff" * 16}), DecodeError),
    (_body(sample=2**64 - 2), DecodeError),
])
def test_structural_refusals_are_typed(body: dict, error: type) -> None:
    with pytest.raises(error):
        FeatureBatch.from_body(body)


def test_byte_limits() -> None:
    with pytest.raises(OversizeError):
        FeatureBatch.from_body(_body(), max_bytes=47)
    with pytest.raises(OversizeError):
        FeatureBatch.from_body(_body(), max_record_bytes=11)
    assert FeatureBatch.from_body(_body(), max_bytes=48, max_record_bytes=12).count == 4


def _records(ids: list[int], device: str = "gw-1") -> list[FeatureRecord]:
    return [FeatureRecord(device, i, {"imu": np.full((2, 3), float(i), np.float32)}, label=i % 3) for i in ids]


def test_consecutive_ids_travel_as_first_and_count_others_as_an_explicit_column() -> None:
    run = FeatureBatch.stack(_records([7, 8, 9]))
    assert run.samples is None and (run.first, run.count) == (7, 3)
    body = run.to_body()
    assert body["sample"] == 7 and "samples" not in body
    gaps = FeatureBatch.stack(_records([7, 9, 12]))
    assert gaps.samples is not None and gaps.samples.dtype == np.dtype("<u8")
    body = gaps.to_body()
    assert "sample" not in body and body["samples"]["shape"] == [3]
    assert gaps.sample_ids().tolist() == [7, 9, 12] and gaps.sample_ids().dtype == np.uint64


def test_a_batch_means_its_records_one_by_one() -> None:
    batch = FeatureBatch.from_body(FeatureBatch.stack(_records([4, 6, 5], device="gw-9")).to_body())
    got = batch.records()
    assert [(r.device, r.sample, r.label) for r in got] == [("gw-9", 4, 1), ("gw-9", 6, 0), ("gw-9", 5, 2)]
    for r in got:
        np.testing.assert_array_equal(r.modalities["imu"], np.full((2, 3), float(r.sample), np.float32))


def test_records_that_differ_in_device_labelling_or_shape_do_not_stack() -> None:
    mixed = _records([1]) + _records([2], device="gw-2")
    with pytest.raises(ValueError, match="same device and modalities"):
        FeatureBatch.stack(mixed)
    half = [FeatureRecord("gw-1", 1, {"imu": np.zeros((2, 3), np.float32)}, label=1),
            FeatureRecord("gw-1", 2, {"imu": np.zeros((2, 3), np.float32)})]
    with pytest.raises(ValueError, match="all or nothing"):
        FeatureBatch.stack(half)
    with pytest.raises(ValueError, match="at least one record"):
        FeatureBatch.stack([])


def test_decoding_honours_the_allowed_modalities_and_the_byte_limit() -> None:
    body = FeatureBatch.stack(_records([1, 2, 3])).to_body()  # 3 x 6 float32 = 72 bytes of imu
    with pytest.raises(WireErrorBase):
        FeatureBatch.from_body(body, allowed_modalities={"env"})
    assert FeatureBatch.from_body(body, allowed_modalities={"imu"}).count == 3
    with pytest.raises(OversizeError):
        FeatureBatch.from_body(body, max_bytes=71)
    assert FeatureBatch.from_body(body, max_bytes=72 + 12).count == 3  # the array and the int32 labels
    both = {**body, "samples": FeatureBatch.stack(_records([1, 5, 9])).to_body()["samples"]}
    with pytest.raises(DecodeError, match="exactly one of 'sample'"):
        FeatureBatch.from_body(both)
    bad_labels = {**body, "labels": {"dtype": "<f4", "shape": [3], "data": np.zeros(3, np.float32).tobytes()}}
    with pytest.raises(ArrayFormatError, match="labels: must be an integer array"):
        FeatureBatch.from_body(bad_labels)
