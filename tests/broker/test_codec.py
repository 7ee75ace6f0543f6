"""The envelope and array codecs: round trips, and one typed error for every decoder check."""

from __future__ import annotations

import time
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from broker import WIRE_VERSION
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
    DeviceConfig,
    DeviceFeedback,
    Envelope,
    ErrorReport,
    FeatureRecord,
    GlobalAdapter,
    Kind,
    ModalityProfile,
    Prediction,
    SiteFeedback,
    decode_array,
    decode_envelope,
    encode_array,
    encode_envelope,
    modality_of,
)
from broker.wire.arrays import MAX_NDIM, wire_dtype
from broker.wire.envelope import DEFAULT_MAX_PAYLOAD, content_type, now_ms
from tests.support.wire import raises_exactly

dtypes = st.sampled_from(sorted(DTYPES)).map(lambda s: DTYPES[s])

BODY_CLASSES = (FeatureRecord, CapabilityProfile, ModalityProfile, DeviceConfig, Prediction, DeviceFeedback,
                ErrorReport, AdapterUpdate, GlobalAdapter, SiteFeedback)


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


# ---------------------------------------------------------------- array encoding


@pytest.mark.parametrize(
    ("dtype", "wire"),
    [(">f4", "<f4"), ("<f4", "<f4"), ("=f8", "<f8"), (">i2", "<i2"), (">c16", "<c16"), ("?", "|b1"), ("u1", "|u1")],
)
def test_wire_dtype_names_the_little_endian_form(dtype: str, wire: str) -> None:
    assert wire_dtype(np.dtype(dtype)) == wire


@pytest.mark.parametrize("dtype", ["O", "<U3", "<M8[s]", "V4"])
def test_unsupported_dtypes_cannot_be_encoded(dtype: str) -> None:
    with raises_exactly(ArrayFormatError) as info:
        encode_array(np.zeros(2, dtype=dtype))
    assert str(info.value) == (f"dtype {np.dtype(dtype)} is not supported on the wire (supported: "
                               f"{sorted(DTYPES)})")


def test_encoded_array_layout() -> None:
    a = np.arange(6, dtype=">i4").reshape(2, 3).T  # big-endian and not C-contiguous
    enc = encode_array(a)
    assert list(enc) == ["dtype", "shape", "data"]
    assert enc["dtype"] == "<i4" and enc["shape"] == [3, 2]
    assert bytes(enc["data"]) == np.ascontiguousarray(a, dtype="<i4").tobytes()
    assert bytes(enc["data"]) == bytes.fromhex("000000000300000001000000040000000200000005000000")


@pytest.mark.parametrize("shape", [(0,), (0, 3), (3, 0), (2, 0, 2)])
def test_empty_arrays_encode_to_no_bytes(shape: tuple[int, ...]) -> None:
    enc = encode_array(np.zeros(shape, np.float32))
    assert enc["shape"] == list(shape) and bytes(enc["data"]) == b""
    back = _roundtrip(np.zeros(shape, np.float32))
    assert back.shape == shape and back.dtype == np.float32


def test_zero_dimensional_array_round_trips() -> None:
    enc = encode_array(np.float64(2.5))
    assert enc["shape"] == [] and bytes(enc["data"]) == np.float64(2.5).tobytes()
    back = decode_array({**enc, "data": bytes(enc["data"])})
    assert back.shape == () and back.dtype == np.float64 and float(back) == 2.5


# ---------------------------------------------------------------- array decoding: every check


GOOD = {"dtype": "<f4", "shape": [2, 3], "data": bytes(24)}
ARRAY_KEYS_MSG = "array must be a map with exactly the keys dtype, shape, data"
DATA_MSG = "array data must be binary"


def _shape_msg(shape: Any) -> str:
    return f"shape must be a list of at most {MAX_NDIM} non-negative ints, got {shape!r}"


class _Dim(int):
    """An int subclass (as an IntEnum member would be): a valid dimension, unlike bool."""


MALFORMED_ARRAYS: list[tuple[str, Any, str]] = [
    ("not a map", [b"<f4", [2, 3], bytes(24)], ARRAY_KEYS_MSG),
    ("a scalar", 3, ARRAY_KEYS_MSG),
    ("none", None, ARRAY_KEYS_MSG),
    ("missing data", {"dtype": "<f4", "shape": [2, 3]}, ARRAY_KEYS_MSG),
    ("extra key", {**GOOD, "order": "C"}, ARRAY_KEYS_MSG),
    ("renamed key", {"dtype": "<f4", "shape": [2, 3], "bytes": bytes(24)}, ARRAY_KEYS_MSG),
    ("object dtype", {**GOOD, "dtype": "|O"}, "unsupported dtype '|O'"),
    ("big-endian dtype", {**GOOD, "dtype": ">f4"}, "unsupported dtype '>f4'"),
    ("native-order dtype", {**GOOD, "dtype": "=f4"}, "unsupported dtype '=f4'"),
    ("dtype as bytes", {**GOOD, "dtype": b"<f4"}, "unsupported dtype b'<f4'"),
    ("dtype as int", {**GOOD, "dtype": 4}, "unsupported dtype 4"),
    ("dtype as list", {**GOOD, "dtype": ["<f4"]}, "unsupported dtype ['<f4']"),
    ("dtype missing value", {**GOOD, "dtype": None}, "unsupported dtype None"),
    ("shape as tuple", {**GOOD, "shape": (2, 3)}, _shape_msg((2, 3))),
    ("shape as int", {**GOOD, "shape": 6}, _shape_msg(6)),
    ("shape as string", {**GOOD, "shape": "23"}, _shape_msg("23")),
    ("too many dims", {**GOOD, "shape": [1] * (MAX_NDIM + 1), "data": bytes(4)}, _shape_msg([1] * (MAX_NDIM + 1))),
    ("negative dim", {**GOOD, "shape": [-2, -3]}, _shape_msg([-2, -3])),
    ("negative dim last", {**GOOD, "shape": [6, -1], "data": bytes(0)}, _shape_msg([6, -1])),
    ("bool dim", {**GOOD, "shape": [True, 6], "data": bytes(24)}, _shape_msg([True, 6])),
    ("float dim", {**GOOD, "shape": [2.0, 3]}, _shape_msg([2.0, 3])),
    ("string dim", {**GOOD, "shape": ["2", 3]}, _shape_msg(["2", 3])),
    ("none dim", {**GOOD, "shape": [None]}, _shape_msg([None])),
    ("negative int-subclass dim", {**GOOD, "shape": [_Dim(-1)], "data": b""}, _shape_msg([_Dim(-1)])),
    ("data as str", {**GOOD, "data": "\0" * 24}, DATA_MSG),
    ("data as list", {**GOOD, "data": [0] * 24}, DATA_MSG),
    ("data missing value", {**GOOD, "data": None}, DATA_MSG),
    ("data short", {**GOOD, "data": bytes(23)}, "dtype <f4 and shape [2, 3] need 24 bytes, payload has 23"),
    ("data long", {**GOOD, "data": bytes(25)}, "dtype <f4 and shape [2, 3] need 24 bytes, payload has 25"),
    ("scalar without data", {**GOOD, "shape": [], "data": b""}, "dtype <f4 and shape [] need 4 bytes, payload has 0"),
    ("empty with data", {**GOOD, "shape": [0, 3], "data": bytes(4)},
     "dtype <f4 and shape [0, 3] need 0 bytes, payload has 4"),
    ("itemsize counts", {**GOOD, "dtype": "<f8"}, "dtype <f8 and shape [2, 3] need 48 bytes, payload has 24"),
]


@pytest.mark.parametrize(("obj", "message"), [c[1:] for c in MALFORMED_ARRAYS], ids=[c[0] for c in MALFORMED_ARRAYS])
def test_each_array_check_raises_array_format_error(obj: Any, message: str) -> None:
    with raises_exactly(ArrayFormatError, message):
        decode_array(obj)


@pytest.mark.parametrize(
    "obj",
    [
        GOOD,
        {"shape": [2, 3], "data": bytes(24), "dtype": "<f4"},  # key order does not matter
        {**GOOD, "data": bytearray(24)},
        {**GOOD, "data": memoryview(bytes(24))},
        {**GOOD, "shape": [1] * MAX_NDIM, "data": bytes(4)},
        {**GOOD, "shape": [0], "data": b""},
        {**GOOD, "shape": [], "data": bytes(4)},
        {**GOOD, "shape": [_Dim(2), _Dim(3)]},
        {**GOOD, "shape": [_Dim(0), 3], "data": b""},
    ],
    ids=["plain", "key order", "bytearray", "memoryview", "max dims", "empty", "scalar", "int subclass dims",
         "int subclass zero dim"],
)
def test_well_formed_arrays_decode(obj: dict[str, Any]) -> None:
    a = decode_array(obj)
    assert a.dtype == np.dtype(obj["dtype"]) and list(a.shape) == [int(d) for d in obj["shape"]]
    assert a.tobytes() == bytes(obj["data"])


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_every_wire_dtype_decodes(name: str) -> None:
    a = np.ones(3, dtype=DTYPES[name])
    back = decode_array({"dtype": name, "shape": [3], "data": a.tobytes()})
    assert back.dtype == DTYPES[name] and back.tobytes() == a.tobytes()


def test_array_size_limit() -> None:
    assert decode_array(GOOD, max_bytes=24).shape == (2, 3)
    assert decode_array(GOOD, max_bytes=None).shape == (2, 3)
    assert decode_array({**GOOD, "shape": [0, 3], "data": b""}, max_bytes=0).shape == (0, 3)
    with raises_exactly(OversizeError, "array of 24 bytes exceeds the limit of 23"):
        decode_array(GOOD, max_bytes=23)
    with raises_exactly(OversizeError, "array of 24 bytes exceeds the limit of 0"):
        decode_array(GOOD, max_bytes=0)
    # a malformed array is a format error whatever its size
    with raises_exactly(ArrayFormatError):
        decode_array({**GOOD, "data": bytes(25)}, max_bytes=1)


def test_decoded_values() -> None:
    data = np.array([[1.5, -2.0], [0.0, 7.25]], dtype="<f4").tobytes()
    a = decode_array({"dtype": "<f4", "shape": [2, 2], "data": data})
    assert a.tolist() == [[1.5, -2.0], [0.0, 7.25]]
    b = decode_array({"dtype": "<i2", "shape": [4], "data": bytes.fromhex("0100ffff0080ff7f")})
    assert b.tolist() == [1, -1, -32768, 32767]


# ---------------------------------------------------------------- envelope


def _envelope(*, drop: tuple[str, ...] = (), extra: dict[str, Any] | None = None, **over: Any) -> bytes:
    doc: dict[str, Any] = {"v": 1, "k": "features", "s": "d", "n": 1, "t": 5, "ct": "x", "b": {}}
    doc.update(over)
    for key in drop:
        del doc[key]
    doc.update(extra or {})
    return msgpack.packb(doc, use_bin_type=True)


KEYS_MSG = "an envelope is a map with exactly the keys v, k, s, n, t, ct, b"
STR_MSG = "envelope sender and content type must be strings"
INT_MSG = "envelope seq and timestamp must be non-negative integers"

MALFORMED_ENVELOPES: list[tuple[str, bytes, type[WireError], str | None]] = [
    ("array of seven", msgpack.packb([1, "features", "d", 1, 5, "x", {}]), DecodeError, KEYS_MSG),
    ("integer", msgpack.packb(7), DecodeError, KEYS_MSG),
    ("string", msgpack.packb("vksntctb"), DecodeError, KEYS_MSG),
    ("missing body", _envelope(drop=("b",)), DecodeError, KEYS_MSG),
    ("missing version", _envelope(drop=("v",)), DecodeError, KEYS_MSG),
    ("extra key", _envelope(extra={"x": 1}), DecodeError, KEYS_MSG),
    ("renamed key", _envelope(drop=("ct",), extra={"c": "x"}), DecodeError, KEYS_MSG),
    ("empty map", msgpack.packb({}), DecodeError, KEYS_MSG),
    ("version 2", _envelope(v=2), SchemaVersionError, "schema version 2 is not supported (this code speaks 1)"),
    ("version 0", _envelope(v=0), SchemaVersionError, "schema version 0 is not supported (this code speaks 1)"),
    ("version as str", _envelope(v="1"), SchemaVersionError,
     "schema version '1' is not supported (this code speaks 1)"),
    ("version as bool", _envelope(v=True), SchemaVersionError,
     "schema version True is not supported (this code speaks 1)"),
    ("version as float", _envelope(v=1.0), SchemaVersionError,
     "schema version 1.0 is not supported (this code speaks 1)"),
    ("version nil", _envelope(v=None), SchemaVersionError,
     "schema version None is not supported (this code speaks 1)"),
    ("unknown kind", _envelope(k="nope"), UnknownKindError, "unknown envelope kind 'nope'"),
    ("kind upper case", _envelope(k="FEATURES"), UnknownKindError, "unknown envelope kind 'FEATURES'"),
    ("kind as int", _envelope(k=3), UnknownKindError, "unknown envelope kind 3"),
    ("kind as bin", _envelope(k=b"features"), UnknownKindError, "unknown envelope kind b'features'"),
    ("kind nil", _envelope(k=None), UnknownKindError, "unknown envelope kind None"),
    ("kind as array", _envelope(k=["features"]), UnknownKindError, "unknown envelope kind ['features']"),
    ("kind as map", _envelope(k={"features": 1}), UnknownKindError, "unknown envelope kind {'features': 1}"),
    ("sender as int", _envelope(s=5), DecodeError, STR_MSG),
    ("sender as bin", _envelope(s=b"d"), DecodeError, STR_MSG),
    ("sender nil", _envelope(s=None), DecodeError, STR_MSG),
    ("content type as int", _envelope(ct=5), DecodeError, STR_MSG),
    ("content type nil", _envelope(ct=None), DecodeError, STR_MSG),
    ("negative seq", _envelope(n=-1), DecodeError, INT_MSG),
    ("seq as str", _envelope(n="1"), DecodeError, INT_MSG),
    ("seq as bool", _envelope(n=True), DecodeError, INT_MSG),
    ("seq as float", _envelope(n=1.0), DecodeError, INT_MSG),
    ("seq nil", _envelope(n=None), DecodeError, INT_MSG),
    ("negative timestamp", _envelope(t=-5), DecodeError, INT_MSG),
    ("timestamp as str", _envelope(t="5"), DecodeError, INT_MSG),
    ("timestamp as bool", _envelope(t=False), DecodeError, INT_MSG),
    ("timestamp as float", _envelope(t=5.0), DecodeError, INT_MSG),
    ("timestamp nil", _envelope(t=None), DecodeError, INT_MSG),
    ("not msgpack", b"\xc1", DecodeError, None),
    ("truncated", _envelope()[:-3], DecodeError, None),
    ("trailing bytes", _envelope() + b"\x00", DecodeError, None),
    ("empty", b"", DecodeError, None),
]


@pytest.mark.parametrize(("payload", "cls", "message"), [c[1:] for c in MALFORMED_ENVELOPES],
                         ids=[c[0] for c in MALFORMED_ENVELOPES])
def test_each_envelope_check_raises_its_error(payload: bytes, cls: type[WireError], message: str | None) -> None:
    with raises_exactly(cls, message) as info:
        decode_envelope(payload)
    if message is None:
        assert str(info.value).startswith("not a msgpack document: ")


def test_garbage_errors_name_what_msgpack_saw() -> None:
    with raises_exactly(DecodeError) as info:
        decode_envelope(b"\xc1")
    assert str(info.value).startswith("not a msgpack document: FormatError: ")
    with raises_exactly(DecodeError) as info:
        decode_envelope(_envelope() + b"\x00")
    assert str(info.value).startswith("not a msgpack document: ExtraData: ")


def test_bodies_may_have_non_string_map_keys() -> None:
    """The envelope decoder accepts any msgpack map in a body; the body decoders then reject non-string keys
    with a typed error instead of msgpack refusing the whole payload."""
    env = decode_envelope(_envelope(b={1: b"x", "q": {2.5: "y"}}))
    assert env.body == {1: b"x", "q": {2.5: "y"}}
    with raises_exactly(DecodeError, "quality must map strings to numbers"):
        FeatureRecord.from_body({"device": "d", "sample": 1, "modalities": {"imu": encode_array(np.zeros(1))},
                                 "quality": {1: 2.0}})


def test_envelope_checks_run_in_order() -> None:
    # the version is judged before the kind, the kind before the fields
    with raises_exactly(SchemaVersionError):
        decode_envelope(_envelope(v=2, k="nope", s=5))
    with raises_exactly(UnknownKindError):
        decode_envelope(_envelope(k="nope", s=5, n=-1))
    with raises_exactly(UnknownKindError):
        decode_envelope(_envelope(s=5, n=-1), expect=Kind.ADAPTER)


def test_expected_kinds() -> None:
    with raises_exactly(UnknownKindError, "expected ['adapter'], got 'features'"):
        decode_envelope(_envelope(), expect=Kind.ADAPTER)
    with raises_exactly(UnknownKindError, "expected ['adapter', 'global'], got 'features'"):
        decode_envelope(_envelope(), expect=frozenset({Kind.GLOBAL, Kind.ADAPTER}))
    assert decode_envelope(_envelope(), expect=Kind.FEATURES).kind is Kind.FEATURES
    assert decode_envelope(_envelope(k="infer"), expect=frozenset({Kind.FEATURES, Kind.INFER})).kind is Kind.INFER
    assert decode_envelope(_envelope(k="chunk"), expect=None).kind is Kind.CHUNK


def test_payload_size_limit() -> None:
    payload = _envelope()
    assert decode_envelope(payload, max_size=len(payload)).seq == 1
    with raises_exactly(OversizeError, f"payload of {len(payload)} bytes exceeds the limit of {len(payload) - 1}"):
        decode_envelope(payload, max_size=len(payload) - 1)
    # the size check comes first: an oversize payload is never unpacked
    with raises_exactly(OversizeError):
        decode_envelope(b"\xc1" * 11, max_size=10)
    assert DEFAULT_MAX_PAYLOAD == 512 * 1024 * 1024


def test_default_size_limit_applies() -> None:
    big = b"\xc1" * (DEFAULT_MAX_PAYLOAD + 1)
    with raises_exactly(OversizeError):
        decode_envelope(memoryview(big))


def test_envelope_fields_and_limits_of_valid_values() -> None:
    env = decode_envelope(_envelope(n=0, t=0, s="", ct="", b=[1, b"\x00"]))
    assert env == Envelope(kind=Kind.FEATURES, sender="", seq=0, ts_ms=0, content_type="", body=[1, b"\x00"],
                           version=1)
    big = decode_envelope(_envelope(n=2**64 - 1, t=2**63))
    assert (big.seq, big.ts_ms) == (2**64 - 1, 2**63)
    assert decode_envelope(bytearray(_envelope(k="model", b=b"onnx"))).body == b"onnx"


@pytest.mark.parametrize("kind", list(Kind))
def test_every_kind_round_trips(kind: Kind) -> None:
    payload = encode_envelope(kind, "sender-1", 12, {"x": b"\x01"}, ts_ms=1_700_000_000_123)
    env = decode_envelope(payload, expect=kind)
    assert env == Envelope(kind=kind, sender="sender-1", seq=12, ts_ms=1_700_000_000_123,
                           content_type=f"application/vnd.megace.{kind.value}+msgpack", body={"x": b"\x01"})
    assert env.version == WIRE_VERSION == 1


def test_encoded_envelope_layout() -> None:
    payload = encode_envelope("global", "c", np.int64(3), {"a": [1]}, ts_ms=np.int64(9), ctype="text/x")
    assert msgpack.unpackb(payload, raw=False) == {"v": 1, "k": "global", "s": "c", "n": 3, "t": 9, "ct": "text/x",
                                                   "b": {"a": [1]}}
    assert list(msgpack.unpackb(payload, raw=False)) == ["v", "k", "s", "n", "t", "ct", "b"]
    assert payload.startswith(bytes.fromhex("87a17601a16ba6676c6f62616c"))
    # bytes travel as msgpack bin, strings as str
    assert msgpack.unpackb(encode_envelope(Kind.MODEL, "e", 1, b"\x00\x01", ts_ms=0), raw=True)[b"b"] == b"\x00\x01"
    with pytest.raises(ValueError):
        encode_envelope("nope", "c", 1, {})


def test_content_type_and_clock() -> None:
    assert content_type(Kind.SITE_FEEDBACK) == "application/vnd.megace.site_feedback+msgpack"
    assert content_type("chunk") == "application/vnd.megace.chunk+msgpack"  # type: ignore[arg-type]
    before = time.time_ns() // 1_000_000
    stamp = now_ms()
    env = decode_envelope(encode_envelope(Kind.FEATURES, "d", 1, {}))
    after = time.time_ns() // 1_000_000
    assert type(stamp) is int and before <= stamp <= env.ts_ms <= after
    assert env.content_type == "application/vnd.megace.features+msgpack"


# ---------------------------------------------------------------- random input


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_only_raise_wire_errors(data: bytes) -> None:
    try:
        env = decode_envelope(data)
    except WireError:
        return
    with pytest.raises(WireError):
        FeatureRecord.from_body(env.body)


_leaves = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5) | st.binary(max_size=8)


@settings(max_examples=300, deadline=None)
@given(st.recursive(_leaves, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4)),
       st.sampled_from(BODY_CLASSES))
def test_random_bodies_raise_wire_errors_or_decode_faithfully(body: object, cls: Any) -> None:
    try:
        msg = cls.from_body(body)
    except WireError:
        return
    # whatever is accepted is a message of the class that survives its own round trip
    assert type(msg) is cls
    assert msgpack.packb(cls.from_body(msg.to_body()).to_body()) == msgpack.packb(msg.to_body())


@pytest.mark.parametrize("cls", BODY_CLASSES)
@pytest.mark.parametrize("body", [None, [], "x", b"x", 1, [("device", "d")]])
def test_non_map_bodies_are_decode_errors(cls: Any, body: object) -> None:
    with raises_exactly(DecodeError) as info:
        cls.from_body(body)
    assert str(info.value).endswith(" body must be a map")


# ---------------------------------------------------------------- bodies used above in the vectors' style


def test_feature_record_round_trip_and_modality_checks() -> None:
    rec = FeatureRecord("dev-1", 7, {"accel": np.ones((10, 30), np.float32), "text": np.arange(4, dtype=np.int64)},
                        label=2, quality={"snr": 12.5})
    env = decode_envelope(encode_envelope(Kind.FEATURES, "dev-1", 3, rec.to_body()))
    back = FeatureRecord.from_body(env.body, allowed_modalities={"accel", "text"})
    assert back.label == 2 and back.quality == {"snr": 12.5} and back.sample == 7 and back.device == "dev-1"
    assert np.array_equal(back.modalities["accel"], rec.modalities["accel"])
    assert np.array_equal(back.modalities["text"], rec.modalities["text"])
    with raises_exactly(UnknownModalityError, "unknown modality 'text'; expected one of ['accel']"):
        FeatureRecord.from_body(env.body, allowed_modalities={"accel"})
    with raises_exactly(UnknownModalityError, "a feature record needs at least one modality"):
        FeatureRecord.from_body({**env.body, "modalities": {}})
    with raises_exactly(UnknownModalityError):
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


def test_the_envelope_head_is_packed_once_per_sender_and_the_cache_stays_bounded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK's per-record saving: ``{"v","k","s","n"`` is packed once per (kind, sender); the bytes are those of
    the plain map (packed here by msgpack itself), and a process speaking for many senders keeps at most
    ``_HEADS_MAX`` heads."""
    from broker.wire import envelope

    envelope._HEADS.clear()
    packed: list[tuple[Kind, str]] = []
    real = envelope._head
    monkeypatch.setattr(envelope, "_head", lambda p, k, s: packed.append((k, s)) or real(p, k, s))
    body = {"device": "d", "sample": 1}
    encode_envelope(Kind.FEATURES, "dev-a", 5, body, ts_ms=1000)
    again = encode_envelope(Kind.FEATURES, "dev-a", 6, body, ts_ms=1001)
    encode_envelope(Kind.INFER, "dev-a", 7, body, ts_ms=1002)
    assert packed == [(Kind.FEATURES, "dev-a"), (Kind.INFER, "dev-a")]
    plain = msgpack.packb({"v": WIRE_VERSION, "k": envelope._VALUES[Kind.FEATURES], "s": "dev-a", "n": 6,
                           "t": 1001, "ct": content_type(Kind.FEATURES), "b": body}, use_bin_type=True)
    assert again == plain
    for i in range(envelope._HEADS_MAX + 5):
        encode_envelope(Kind.FEATURES, f"sender-{i}", 1, body, ts_ms=1)
        assert len(envelope._HEADS) <= envelope._HEADS_MAX
