from __future__ import annotations

import contextlib

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from broker.errors import (
    ArrayFormatError,
    DecodeError,
    OversizeError,
    SchemaVersionError,
    UnknownKindError,
    UnknownModalityError,
    WireError,
)
from broker.wire import (
    DTYPES,
    AdapterUpdate,
    CapabilityProfile,
    FeatureRecord,
    GlobalAdapter,
    Kind,
    ModalityProfile,
    SiteFeedback,
    decode_array,
    decode_envelope,
    encode_array,
    encode_envelope,
    modality_of,
)

dtypes = st.sampled_from(sorted(DTYPES)).map(lambda s: DTYPES[s])


def _roundtrip(a: np.ndarray) -> np.ndarray:
    payload = encode_envelope(Kind.FEATURES, "d", 0, {"a": encode_array(a)})
    return decode_array(decode_envelope(payload).body["a"])


@settings(max_examples=300, deadline=None)
@given(hnp.arrays(dtype=dtypes, shape=hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=6)))
def test_arrays_round_trip_bit_exactly(a: np.ndarray) -> None:
    b = _roundtrip(a)
    assert b.dtype == a.dtype and b.shape == a.shape
    assert b.tobytes() == a.tobytes()  # bit-exact, NaN payloads included


@given(hnp.arrays(dtype=st.sampled_from([">f4", ">i8", ">u2"]), shape=hnp.array_shapes(max_dims=3)))
def test_big_endian_and_strided_input_is_normalised(a: np.ndarray) -> None:
    b = _roundtrip(a[..., ::-1])
    assert b.dtype.byteorder in "<|=" and np.array_equal(b, a[..., ::-1], equal_nan=True)


def test_large_array_decodes_without_copy() -> None:
    a = np.arange(1 << 18, dtype=np.float32)
    payload = encode_envelope(Kind.FEATURES, "d", 0, {"a": encode_array(a)})
    env = decode_envelope(payload)
    b = decode_array(env.body["a"])
    assert not b.flags.owndata and not b.flags.writeable  # a view over the received bytes
    assert np.array_equal(a, b)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_only_raise_wire_errors(data: bytes) -> None:
    try:
        env = decode_envelope(data)
    except WireError:
        return
    with pytest.raises(WireError):
        FeatureRecord.from_body(env.body)


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5) | st.binary(max_size=8),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4)))
def test_random_bodies_only_raise_wire_errors(body: object) -> None:
    for cls in (FeatureRecord, CapabilityProfile, AdapterUpdate, GlobalAdapter, SiteFeedback):
        with contextlib.suppress(WireError):
            cls.from_body(body)


def _envelope(**over: object) -> bytes:
    doc = {"v": 1, "k": "features", "s": "d", "n": 1, "t": 5, "ct": "x", "b": {}}
    doc.update(over)
    return msgpack.packb(doc)


def test_envelope_errors_are_typed() -> None:
    with pytest.raises(SchemaVersionError):
        decode_envelope(_envelope(v=2))
    with pytest.raises(UnknownKindError):
        decode_envelope(_envelope(k="nope"))
    with pytest.raises(UnknownKindError):
        decode_envelope(_envelope(), expect=Kind.ADAPTER)
    with pytest.raises(DecodeError):
        decode_envelope(_envelope(n=-1))
    with pytest.raises(DecodeError):
        decode_envelope(b"\xc1")
    with pytest.raises(OversizeError):
        decode_envelope(_envelope(), max_size=10)


def test_array_inconsistencies_are_typed() -> None:
    good = encode_array(np.zeros((2, 3), np.float32))
    with pytest.raises(ArrayFormatError, match="need 24 bytes"):
        decode_array({**good, "data": b"\0" * 23})
    with pytest.raises(ArrayFormatError, match="unsupported dtype"):
        decode_array({**good, "dtype": "<O"})
    with pytest.raises(ArrayFormatError):
        decode_array({**good, "shape": [2, -3]})
    with pytest.raises(OversizeError):
        decode_array({**good, "data": bytes(good["data"])}, max_bytes=8)


def test_feature_record_round_trip_and_modality_checks() -> None:
    rec = FeatureRecord("dev-1", 7, {"accel": np.ones((10, 30), np.float32), "text": np.arange(4, dtype=np.int64)},
                        label=2, quality={"snr": 12.5})
    env = decode_envelope(encode_envelope(Kind.FEATURES, "dev-1", 3, rec.to_body()))
    back = FeatureRecord.from_body(env.body, allowed_modalities={"accel", "text"})
    assert back.label == 2 and back.quality == {"snr": 12.5} and back.sample == 7
    assert np.array_equal(back.modalities["accel"], rec.modalities["accel"])
    with pytest.raises(UnknownModalityError):
        FeatureRecord.from_body(env.body, allowed_modalities={"accel"})
    with pytest.raises(UnknownModalityError):
        FeatureRecord.from_body({**env.body, "modalities": {}})
    with pytest.raises(UnknownModalityError):
        FeatureRecord.from_body({**env.body, "modalities": {"Bad Name": env.body["modalities"]["accel"]}})


def test_capability_profile_round_trip() -> None:
    prof = CapabilityProfile("d", {"audio": ModalityProfile((20, 20), "<f4", 16000.0)}, {"ram_mb": 512}, "0.1")
    assert CapabilityProfile.from_body(prof.to_body()) == prof


def test_adapter_update_round_trip_and_modality_tags() -> None:
    tensors = {
        "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight": np.ones((4, 8), np.float16),
        "base_model.model.modality_proj.audio.lora_B.weight": np.zeros((8, 4), np.float32),
    }
    up = AdapterUpdate("e1", "s1", 3, 2, "fp", 4, 8.0, 100, {"audio": 100}, tensors, {"acc": 0.5})
    env = decode_envelope(encode_envelope(Kind.ADAPTER, "e1", 3, up.to_body()), expect=Kind.ADAPTER)
    back = AdapterUpdate.from_body(env.body)
    assert back.rank == 4 and back.modalities == {"audio": 100}
    assert {k: v.tobytes() for k, v in back.tensors.items()} == {k: v.tobytes() for k, v in tensors.items()}
    assert [modality_of(k) for k in tensors] == [None, "audio"]
