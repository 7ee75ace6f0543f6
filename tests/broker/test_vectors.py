"""The language-neutral test vectors in docs/wire are reproduced byte for byte from their meaning."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from broker import topics
from broker.chunking import frames
from broker.inbox import Inbox
from broker.wire import (
    CapabilityProfile,
    DeviceConfig,
    DeviceFeedback,
    ErrorReport,
    FeatureBatch,
    FeatureRecord,
    Kind,
    ModalityProfile,
    ModelUpdate,
    Prediction,
    Receipt,
    RegisterRequest,
    decode_envelope,
    encode_envelope,
)
from broker.wire.bodies import decode_body

VECTORS = json.loads((Path(__file__).parents[2] / "docs" / "wire" / "test_vectors.json").read_text())
ENVELOPE_VECTORS = [v for v in VECTORS if "kind" in v["meaning"]]


def _array(spec: dict[str, Any]) -> np.ndarray:
    return np.array(spec["values"], dtype=spec["dtype"]).reshape(spec["shape"])


def _build(m: dict[str, Any]) -> Any:
    if m["kind"] == "features":
        return FeatureRecord(m["device"], m["sample"], {k: _array(v) for k, v in m["modalities"].items()},
                             label=m.get("label"), quality=m.get("quality", {}))
    if m["kind"] == "features_batch":
        return FeatureBatch(m["device"], m["sample"], m["count"], {k: _array(v) for k, v in m["modalities"].items()},
                            labels=_array(m["labels"]) if "labels" in m else None)
    if m["kind"] == "register":
        mods = {k: ModalityProfile(tuple(v["shape"]), v["dtype"], v["rate_hz"]) for k, v in m["modalities"].items()}
        return CapabilityProfile(m["device"], mods, m["compute"], m["sdk"])
    if m["kind"] == "prediction":
        return Prediction(m["device"], m["sample"], m["label"], _array(m["probs"]), m["model_version"])
    if m["kind"] == "config":
        return DeviceConfig(m["modalities"], m["rate_hz"], {k: tuple(v) for k, v in m["shapes"].items()},
                            m["model_version"])
    if m["kind"] == "error":
        return ErrorReport(m["code"], m["message"], m.get("ref"))
    if m["kind"] == "feedback":
        return DeviceFeedback(m["global_version"], m["metrics"], m["message"])
    if m["kind"] == "model":
        return ModelUpdate(m["model_version"], bytes.fromhex(m["sha256_hex"]),
                           {k: tuple(v) for k, v in m["inputs"].items()}, m["input_names"], m["classes"],
                           bytes.fromhex(m["data_hex"]), m["format"])
    if m["kind"] == "register_request":
        return RegisterRequest(m["site"], m["edge"])
    if m["kind"] == "receipt":
        return Receipt(m["device"], m["upto"], tuple(m["missing"]))
    raise AssertionError(m["kind"])


@pytest.mark.parametrize("vector", ENVELOPE_VECTORS, ids=lambda v: v["name"])
def test_codec_reproduces_vector_bytes(vector: dict[str, Any]) -> None:
    m = vector["meaning"]
    payload = encode_envelope(Kind(m["kind"]), m["sender"], m["seq"], _build(m).to_body(), ts_ms=m["ts_ms"])
    assert payload.hex() == vector["hex"]


def _assert_array(got: np.ndarray, spec: dict[str, Any]) -> None:
    """``got`` is the array the vector describes: dtype string, shape and values straight from the JSON."""
    assert got.dtype.str == spec["dtype"] and list(got.shape) == spec["shape"]
    assert got.reshape(-1).tolist() == spec["values"]


@pytest.mark.parametrize("vector", ENVELOPE_VECTORS, ids=lambda v: v["name"])
def test_vector_decodes_to_its_meaning(vector: dict[str, Any]) -> None:
    """Decode the bytes and compare every field with the vector's JSON meaning (not with our own encoder)."""
    m = vector["meaning"]
    env = decode_envelope(bytes.fromhex(vector["hex"]), expect=Kind(m["kind"]))
    assert (env.version, env.kind.value, env.sender, env.seq, env.ts_ms) == (1, m["kind"], m["sender"], m["seq"],
                                                                            m["ts_ms"])
    assert env.content_type == f"application/vnd.megace.{m['kind']}+msgpack"
    parsed = topics.parse(vector["topic"])
    msg = decode_body(env)
    if m["kind"] == "register_request":  # the one site-wide topic: no device in it
        assert (parsed.channel, parsed.site, parsed.what, parsed.chunk_index) == (
            topics.Channel.SITE_REQUEST, m["site"], "register", None)
        assert isinstance(msg, RegisterRequest) and (msg.site, msg.edge) == (m["site"], m["edge"])
        return
    assert parsed.what == m["kind"].removesuffix("_batch") and parsed.device == "gw-7" and parsed.chunk_index is None
    if m["kind"] == "features":
        assert isinstance(msg, FeatureRecord)
        assert (msg.device, msg.sample, msg.label, msg.quality) == (m["device"], m["sample"], m.get("label"),
                                                                    m.get("quality", {}))
        assert sorted(msg.modalities) == sorted(m["modalities"])
        for name, spec in m["modalities"].items():
            _assert_array(msg.modalities[name], spec)
    elif m["kind"] == "features_batch":
        assert isinstance(msg, FeatureBatch)
        assert (msg.device, msg.first, msg.count, msg.samples) == (m["device"], m["sample"], m["count"], None)
        assert sorted(msg.modalities) == sorted(m["modalities"])
        for name, spec in m["modalities"].items():
            _assert_array(msg.modalities[name], spec)
        _assert_array(msg.labels, m["labels"])
    elif m["kind"] == "register":
        assert isinstance(msg, CapabilityProfile)
        assert (msg.device, msg.compute, msg.sdk_version) == (m["device"], m["compute"], m["sdk"])
        assert sorted(msg.modalities) == sorted(m["modalities"])
        for name, spec in m["modalities"].items():
            prof = msg.modalities[name]
            assert (list(prof.shape), prof.dtype, prof.rate_hz) == (spec["shape"], spec["dtype"], spec["rate_hz"])
    elif m["kind"] == "prediction":
        assert isinstance(msg, Prediction)
        assert (msg.device, msg.sample, msg.label, msg.model_version) == (m["device"], m["sample"], m["label"],
                                                                          m["model_version"])
        _assert_array(msg.probs, m["probs"])
    elif m["kind"] == "config":
        assert isinstance(msg, DeviceConfig)
        assert (msg.modalities, msg.rate_hz, msg.model_version) == (m["modalities"], m["rate_hz"], m["model_version"])
        assert {k: list(v) for k, v in msg.shapes.items()} == m["shapes"]
    elif m["kind"] == "error":
        assert isinstance(msg, ErrorReport)
        assert (msg.code, msg.message, msg.ref) == (m["code"], m["message"], m.get("ref"))
    elif m["kind"] == "feedback":
        assert isinstance(msg, DeviceFeedback)
        assert (msg.global_version, msg.metrics, msg.message) == (m["global_version"], m["metrics"], m["message"])
        assert all(type(v) is float for v in msg.metrics.values())
    elif m["kind"] == "model":
        assert isinstance(msg, ModelUpdate)
        assert (msg.model_version, msg.format, msg.classes, msg.input_names) == (
            m["model_version"], m["format"], m["classes"], m["input_names"])
        assert {k: list(v) for k, v in msg.inputs.items()} == m["inputs"]
        assert msg.data.hex() == m["data_hex"] and hashlib.sha256(msg.data).hexdigest() == m["sha256_hex"]
        assert msg.sha256.hex() == m["sha256_hex"]
    elif m["kind"] == "receipt":
        assert isinstance(msg, Receipt)
        assert (msg.device, msg.upto, list(msg.missing)) == (m["device"], m["upto"], m["missing"])
    else:
        raise AssertionError(f"vector {vector['name']} has a kind this test does not know: {m['kind']}")


def test_vectors_cover_the_documented_cases() -> None:
    assert [v["name"] for v in VECTORS] == ["features-accel", "features-two-modalities-no-label", "register",
                                            "config", "error", "feedback", "prediction", "signed-prediction",
                                            "features-batch", "chunk-0-of-3", "model", "register-request",
                                            "receipt"]
    spec = (Path(__file__).parents[2] / "docs" / "wire" / "SPEC.md").read_text()
    worked = next(v for v in VECTORS if v["name"] == "features-accel")
    block = spec.split("Vector `features-accel`", 1)[1].split("```")[1]
    assert "".join(block.split()) == worked["hex"]  # the SPEC's worked example is the vector, byte for byte


def test_chunk_vector_reassembles(monkeypatch: pytest.MonkeyPatch) -> None:
    vec = next(v for v in VECTORS if v["name"] == "chunk-0-of-3")
    whole = bytes.fromhex(vec["meaning"]["whole_hex"])
    monkeypatch.setattr("os.urandom", lambda n: bytes(range(n)))
    msgs = frames("t", whole, sender="gw-7", seq=10, max_packet=512, ts_ms=1_700_000_000_000)
    assert len(msgs) == 3 and msgs[0][1].hex() == vec["hex"]
    # a chunk's envelope carries the sender and n of the envelope it carries (SPEC §4): one n, not one per chunk
    chunk_env, inner = decode_envelope(bytes.fromhex(vec["hex"])), decode_envelope(whole)
    assert (chunk_env.kind, chunk_env.sender, chunk_env.seq) == (Kind.CHUNK, vec["meaning"]["sender"],
                                                                vec["meaning"]["seq"])
    assert (inner.sender, inner.seq) == (vec["meaning"]["sender"], vec["meaning"]["seq"])
    assert all(decode_envelope(p).seq == vec["meaning"]["seq"] for _, p in msgs)
    inbox = Inbox()
    assert inbox.accept(vec["topic"], bytes.fromhex(vec["hex"])) is None
    assert inbox.accept(vec["topic"].replace("/chunk/0", "/chunk/2"), msgs[2][1]) is None
    got = inbox.accept(vec["topic"].replace("/chunk/0", "/chunk/1"), msgs[1][1])
    assert got is not None and got[1].body == decode_envelope(whole).body
    assert np.array_equal(decode_body(got[1]).modalities["accel"], np.arange(96, dtype="<f4").reshape(32, 3))


def test_the_signed_vector_is_reproduced_from_its_key_and_verifies() -> None:
    """Built from the seed with ``cryptography`` and the msgpack layout of the spec, not with broker.signing."""
    import hashlib

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from broker.signing import Verifier

    vec = next(v for v in VECTORS if v["name"] == "signed-prediction")
    m = vec["meaning"]
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(m["private_seed_hex"]))
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert public.hex() == m["public_hex"] and hashlib.sha256(public).hexdigest()[:16] == m["kid"]
    env = bytes.fromhex(m["envelope_hex"])
    assert m["envelope_hex"] == next(v for v in VECTORS if v["name"] == "prediction")["hex"]
    sig = key.sign(b"megace-sm-v1\0" + env)
    assert len(env) < 256
    expected = (b"\x84\xa2sm\x01\xa3kid\xb0" + m["kid"].encode() + b"\xa3sig\xc4\x40" + sig + b"\xa1e\xc4"
                + bytes([len(env)]) + env)
    assert vec["hex"] == expected.hex()
    assert Verifier([key.public_key()]).open(bytes.fromhex(vec["hex"])) == env
