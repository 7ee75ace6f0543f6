"""The ``model`` downlink body and the registration's ``local_model`` flag: exact fields, typed refusals, limits,
the fit rule, and old registrations unchanged (SPEC §3, "model")."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgpack
import pytest

from broker.errors import DecodeError, OversizeError, UnknownModalityError
from broker.wire import CapabilityProfile, Kind, ModalityProfile, ModelUpdate, decode_envelope, encode_envelope
from broker.wire.bodies import decode_body
from broker.wire.model import MAX_MODEL_INPUTS

DATA = b"\x08\x08onnx-bytes"
VECTORS = {v["name"]: v for v in json.loads((Path(__file__).parents[2] / "docs/wire/test_vectors.json").read_text())}


@contextmanager
def refused(cls: type[Exception], text: str) -> Iterator[None]:
    """Exactly ``cls`` (receivers count by class name), with ``text`` in its message."""
    with pytest.raises(cls) as info:
        yield
    assert type(info.value) is cls and text in str(info.value), (type(info.value), str(info.value))


def body(**changes: Any) -> dict[str, Any]:
    b: dict[str, Any] = {"model_version": 7, "format": "onnx", "sha256": hashlib.sha256(DATA).digest(),
                         "classes": 4, "inputs": {"imu": [4, 6], "env": [1, 8]},
                         "input_names": ["env", "env_mask", "imu", "imu_mask", "presence"], "data": DATA}
    b.update(changes)
    return {k: v for k, v in b.items() if v is not None}


def test_a_model_body_round_trips_with_its_fields_in_the_documented_order() -> None:
    msg = ModelUpdate.from_body(body())
    assert (msg.model_version, msg.format, msg.classes, msg.data) == (7, "onnx", 4, DATA)
    assert msg.inputs == {"imu": (4, 6), "env": (1, 8)} and msg.sha256 == hashlib.sha256(DATA).digest()
    wire = msgpack.unpackb(encode_envelope(Kind.MODEL, "e", 3, msg.to_body()), raw=False)["b"]
    assert list(wire) == ["model_version", "format", "sha256", "classes", "inputs", "input_names", "data"]
    assert list(wire["inputs"]) == ["env", "imu"]  # sorted: the bytes do not depend on dict order
    assert decode_body(decode_envelope(encode_envelope(Kind.MODEL, "e", 3, msg.to_body()))) == msg


@pytest.mark.parametrize(("changes", "error", "text"), [
    ({"model_version": -1}, DecodeError, "field 'model_version' must be >= 0"),
    ({"model_version": 2**63}, DecodeError, "model_version 9223372036854775808 is out of range"),
    ({"model_version": 7.0}, DecodeError, "field 'model_version' has the wrong type float"),
    ({"model_version": True}, DecodeError, "field 'model_version' must be an integer"),
    ({"format": "tflite"}, DecodeError, "unknown model format 'tflite'"),
    ({"format": None}, DecodeError, "missing field 'format'"),
    ({"sha256": hashlib.sha256(DATA).hexdigest()}, DecodeError, "field 'sha256' must be 32 bytes"),
    ({"sha256": b"\x00" * 31}, DecodeError, "field 'sha256' must be 32 bytes"),
    ({"classes": 0}, DecodeError, "field 'classes' must be >= 1"),
    ({"classes": 70_000}, DecodeError, "classes 70000 exceeds 65536"),
    ({"data": b""}, DecodeError, "field 'data' must be non-empty bytes"),
    ({"data": "text"}, DecodeError, "field 'data' must be non-empty bytes"),
    ({"inputs": {}}, DecodeError, "field 'inputs' must name at least one modality"),
    ({"inputs": {"imu": [4]}}, DecodeError, "inputs['imu'] must be [tokens, token_dim]"),
    ({"inputs": {"imu": [0, 6]}}, DecodeError, "inputs['imu'] must be [tokens, token_dim]"),
    ({"inputs": {"imu": [4, 6.0]}}, DecodeError, "inputs['imu'] must be [tokens, token_dim]"),
    ({"inputs": {"imu": [5000, 6]}}, DecodeError, "inputs['imu'] must be [tokens, token_dim]"),
    ({"inputs": {"IMU": [4, 6]}}, UnknownModalityError, "malformed modality name 'IMU'"),
    ({"inputs": {f"m{i}": [1, 1] for i in range(MAX_MODEL_INPUTS + 1)}}, DecodeError, "more than 64 modalities"),
    ({"input_names": []}, DecodeError, "field 'input_names' must list 1 to 64 names"),
    ({"input_names": ["imu", ""]}, DecodeError, "must hold strings of 1 to 128 characters"),
    ({"input_names": ["imu", 3]}, DecodeError, "must hold strings of 1 to 128 characters"),
    ({"input_names": ["imu", "imu"]}, DecodeError, "field 'input_names' repeats a name"),
])
def test_each_malformed_field_is_a_typed_error(changes: dict[str, Any], error: type, text: str) -> None:
    with refused(error, text):
        ModelUpdate.from_body(body(**changes))


def test_size_limit_and_a_mismatching_sha256_is_not_a_codec_error() -> None:
    with refused(OversizeError, "model of 12 bytes exceeds the limit of 11"):
        ModelUpdate.from_body(body(), max_bytes=11)
    # the digest is checked by the device (a typed, counted refusal there), not by the codec
    assert ModelUpdate.from_body(body(sha256=bytes(32))).sha256 == bytes(32)


def test_the_fit_rule_shared_by_edge_and_device() -> None:
    msg = ModelUpdate.from_body(body())
    fits = CapabilityProfile("d", {"imu": ModalityProfile((10, 6)), "gps": ModalityProfile((2,))})
    assert msg.fit_error(fits) is None  # a longer registered sequence is fine; other modalities are not judged
    assert msg.fit_error(CapabilityProfile("d", {"env": ModalityProfile((8,))})) is None
    assert msg.fit_error(CapabilityProfile("d", {"imu": ModalityProfile((4, 5))})) == (
        "modality 'imu': registered (4, 5), the model takes tokens of width 6")
    assert msg.fit_error(CapabilityProfile("d", {"imu": ModalityProfile((2, 4, 6))})) is not None
    assert msg.fit_error(CapabilityProfile("d", {"gps": ModalityProfile((2,))})) == (
        "the model reads ['env', 'imu'], the device registered ['gps']")


def test_local_model_and_model_version_in_a_registration_are_optional_and_strict() -> None:
    register = decode_envelope(bytes.fromhex(VECTORS["register"]["hex"]))
    old = CapabilityProfile.from_body(register.body)
    assert (old.local_model, old.model_version) == (False, None)
    # a profile that does not ask encodes exactly as before: the published vector is unchanged
    assert encode_envelope(Kind.REGISTER, "gw-7", 0, old.to_body(), ts_ms=register.ts_ms).hex() == \
        VECTORS["register"]["hex"]
    asking = CapabilityProfile("gw-7", old.modalities, local_model=True, model_version=3)
    b = msgpack.unpackb(msgpack.packb(asking.to_body()), raw=False)
    assert (b["local_model"], b["model_version"]) == (True, 3)
    back = CapabilityProfile.from_body(b)
    assert (back.local_model, back.model_version) == (True, 3)
    for bad, text in [({"local_model": 1}, "field 'local_model' must be true or false, got 1"),
                      ({"local_model": "true"}, "field 'local_model' must be true or false, got 'true'"),
                      ({"model_version": -2}, "field 'model_version' must be >= 0"),
                      ({"model_version": 2**63}, "model_version 9223372036854775808 is out of range")]:
        with refused(DecodeError, text):
            CapabilityProfile.from_body({**b, **bad})
    assert CapabilityProfile.from_body({**b, "local_model": False}).local_model is False


def test_the_spec_shows_the_model_vector_byte_for_byte() -> None:
    spec = (Path(__file__).parents[2] / "docs/wire/SPEC.md").read_text()
    block = spec.split("Vector `model`", 1)[1].split("```")[1]
    assert "".join(block.split()) == VECTORS["model"]["hex"]
