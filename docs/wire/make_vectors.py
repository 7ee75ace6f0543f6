"""Regenerate docs/wire/test_vectors.json from the reference codec (run after a deliberate wire change)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker import topics
from broker.chunking import frames
from broker.signing import Signer, raw_public
from broker.wire import (
    CapabilityProfile,
    DeviceConfig,
    DeviceFeedback,
    ErrorCode,
    ErrorReport,
    FeatureBatch,
    FeatureRecord,
    FeedbackMessage,
    Kind,
    ModalityProfile,
    ModelUpdate,
    Prediction,
    Receipt,
    RegisterRequest,
    encode_envelope,
)

TS = 1_700_000_000_000
TINY_ONNX = bytes.fromhex(
    "080812003abc010a310a05616363656c0a04617865731206706f6f6c6564220952656475636553756d2a0f0a086b65657064696d7318"
    "00a001020a2e0a06706f6f6c6564120570726f62732207536f66746d61782a140a046178697318ffffffffffffffffff01a0010212016d"
    "2a14080110074204617865734a0801000000000000005a200a05616363656c12170a15080112110a07120562617463680a0208010a0208"
    "03621c0a0570726f627312130a110801120d0a07120562617463680a02080342040a00100d")
"""A real 201-byte ONNX model (opset 13): ``accel`` float [batch, 1, 3] -> ReduceSum over tokens -> Softmax ->
``probs`` [batch, 3]; for [[0.5, -1.0, 2.0]] it gives about [0.1753, 0.0391, 0.7856]."""
SEED = bytes(range(32))  # the test vector's key: never use a published key for anything else


def vectors() -> list[dict]:
    out = []
    rec = FeatureRecord("gw-7", 42, {"accel": np.array([[0.5, -1.0, 2.0]], dtype="<f4")}, label=3,
                        quality={"snr": 20.0})
    out.append({
        "name": "features-accel",
        "topic": topics.device_up("site-a", "gw-7", topics.Uplink.FEATURES),
        "meaning": {"kind": "features", "sender": "gw-7", "seq": 7, "ts_ms": TS, "device": "gw-7", "sample": 42,
                    "modalities": {"accel": {"dtype": "<f4", "shape": [1, 3], "values": [0.5, -1.0, 2.0]}},
                    "label": 3, "quality": {"snr": 20.0}},
        "hex": encode_envelope(Kind.FEATURES, "gw-7", 7, rec.to_body(), ts_ms=TS).hex(),
    })
    rec2 = FeatureRecord("gw-7", 43, {"image": np.array([[1, 2], [3, 4]], dtype="|u1"),
                                      "text": np.array([101, 2023], dtype="<i8")})
    out.append({
        "name": "features-two-modalities-no-label",
        "topic": topics.device_up("site-a", "gw-7", topics.Uplink.FEATURES),
        "meaning": {"kind": "features", "sender": "gw-7", "seq": 8, "ts_ms": TS, "device": "gw-7", "sample": 43,
                    "modalities": {"image": {"dtype": "|u1", "shape": [2, 2], "values": [1, 2, 3, 4]},
                                   "text": {"dtype": "<i8", "shape": [2], "values": [101, 2023]}}},
        "hex": encode_envelope(Kind.FEATURES, "gw-7", 8, rec2.to_body(), ts_ms=TS).hex(),
    })
    prof = CapabilityProfile("gw-7", {"accel": ModalityProfile((10, 30), "<f4", 50.0)}, {"ram_mb": 256.0}, "0.1.0")
    out.append({
        "name": "register",
        "topic": topics.device_up("site-a", "gw-7", topics.Uplink.REGISTER),
        "meaning": {"kind": "register", "sender": "gw-7", "seq": 0, "ts_ms": TS, "device": "gw-7",
                    "modalities": {"accel": {"shape": [10, 30], "dtype": "<f4", "rate_hz": 50.0}},
                    "compute": {"ram_mb": 256.0}, "sdk": "0.1.0", "retain": True},
        "hex": encode_envelope(Kind.REGISTER, "gw-7", 0, prof.to_body(), ts_ms=TS).hex(),
    })
    cfg = DeviceConfig(["accel"], {"accel": 50.0}, {"accel": (10, 30)}, model_version=5)
    out.append({
        "name": "config",
        "topic": topics.device_down("site-a", "gw-7", topics.Downlink.CONFIG),
        "meaning": {"kind": "config", "sender": "edge-1", "seq": 8, "ts_ms": TS, "modalities": ["accel"],
                    "rate_hz": {"accel": 50.0}, "shapes": {"accel": [10, 30]}, "model_version": 5,
                    "note": "the answer to the register vector: accel agreed as 10 tokens of width 30"},
        "hex": encode_envelope(Kind.CONFIG, "edge-1", 8, cfg.to_body(), ts_ms=TS).hex(),
    })
    err = ErrorReport(ErrorCode.PROFILE_MISMATCH.value, "ProfileMismatchError: modality 'gyro' is not in the agreement",
                      ref=7)
    out.append({
        "name": "error",
        "topic": topics.device_down("site-a", "gw-7", topics.Downlink.ERROR),
        "meaning": {"kind": "error", "sender": "edge-1", "seq": 10, "ts_ms": TS, "code": "profile_mismatch",
                    "message": "ProfileMismatchError: modality 'gyro' is not in the agreement", "ref": 7,
                    "note": "ref is the n of the refused envelope, not its sample"},
        "hex": encode_envelope(Kind.ERROR, "edge-1", 10, err.to_body(), ts_ms=TS).hex(),
    })
    fb = DeviceFeedback(5, {"accuracy": 0.75, "samples": 120.0}, FeedbackMessage.VIEW.value)
    out.append({
        "name": "feedback",
        "topic": topics.device_down("site-a", "gw-7", topics.Downlink.FEEDBACK),
        "meaning": {"kind": "feedback", "sender": "edge-1", "seq": 11, "ts_ms": TS, "global_version": 5,
                    "metrics": {"accuracy": 0.75, "samples": 120.0}, "message": "view",
                    "note": "metrics are float64, counts included (120.0, not 120)"},
        "hex": encode_envelope(Kind.FEEDBACK, "edge-1", 11, fb.to_body(), ts_ms=TS).hex(),
    })
    pred = Prediction("gw-7", 42, 1, np.array([0.25, 0.75], dtype="<f4"), model_version=5)
    out.append({
        "name": "prediction",
        "topic": topics.device_down("site-a", "gw-7", topics.Downlink.PREDICTION),
        "meaning": {"kind": "prediction", "sender": "edge-1", "seq": 9, "ts_ms": TS, "device": "gw-7", "sample": 42,
                    "label": 1, "probs": {"dtype": "<f4", "shape": [2], "values": [0.25, 0.75]},
                    "model_version": 5},
        "hex": encode_envelope(Kind.PREDICTION, "edge-1", 9, pred.to_body(), ts_ms=TS).hex(),
    })
    pred_env = encode_envelope(Kind.PREDICTION, "edge-1", 9, pred.to_body(), ts_ms=TS)
    signer = Signer(Ed25519PrivateKey.from_private_bytes(SEED))
    signed_pred = signer.sign(pred_env)
    out.append({
        "name": "signed-prediction",
        "topic": topics.device_down("site-a", "gw-7", topics.Downlink.PREDICTION),
        "meaning": {"note": "the prediction vector's envelope, signed by the edge: Ed25519 over "
                            "b'megace-sm-v1\\0' + envelope; kid = sha256(public key)[:8] as hex",
                    "envelope_hex": pred_env.hex(), "private_seed_hex": SEED.hex(),
                    "public_hex": raw_public(signer.public_key).hex(), "kid": signer.kid},
        "hex": signed_pred.hex(),
    })
    batch = FeatureBatch("gw-7", 100, 2, {"accel": np.array([[[0.5, -1.0, 2.0]], [[1.0, 0.0, -2.0]]], dtype="<f4")},
                         labels=np.array([3, 1], dtype="<i4"))
    out.append({
        "name": "features-batch",
        "topic": topics.device_up("site-a", "gw-7", topics.Uplink.FEATURES),
        "meaning": {"kind": "features_batch", "sender": "gw-7", "seq": 12, "ts_ms": TS, "device": "gw-7",
                    "sample": 100, "count": 2,
                    "modalities": {"accel": {"dtype": "<f4", "shape": [2, 1, 3],
                                             "values": [0.5, -1.0, 2.0, 1.0, 0.0, -2.0]}},
                    "labels": {"dtype": "<i4", "shape": [2], "values": [3, 1]},
                    "note": "records 100 and 101, each accel [1, 3] with labels 3 and 1, as one message"},
        "hex": encode_envelope(Kind.FEATURES_BATCH, "gw-7", 12, batch.to_body(), ts_ms=TS).hex(),
    })
    big = FeatureRecord("gw-7", 44, {"accel": np.arange(96, dtype="<f4").reshape(32, 3)})
    whole = encode_envelope(Kind.FEATURES, "gw-7", 10, big.to_body(), ts_ms=TS)
    out.append({
        "name": "chunk-0-of-3",
        "topic": topics.chunk(topics.device_up("site-a", "gw-7", topics.Uplink.FEATURES), 0),
        "meaning": {"note": "first of the 3 chunks (max_packet=512, 256 data bytes each) that carry whole_hex, a "
                            "features record of 32x3 float32 0..95; every chunk's envelope carries the sender "
                            "and n of the envelope it carries (here 10), kind chunk; "
                            "transfer id is 16 random bytes (here fixed to 00..0f for the vector)",
                    "sender": "gw-7", "seq": 10, "whole_hex": whole.hex()},
        "hex": _fixed_chunk(whole),
    })
    model = ModelUpdate(5, hashlib.sha256(TINY_ONNX).digest(), {"accel": (1, 3)}, ["accel"], 3, TINY_ONNX)
    out.append({
        "name": "model",
        "topic": topics.device_down("site-a", "gw-7", topics.Downlink.MODEL),
        "meaning": {"kind": "model", "sender": "edge-1", "seq": 13, "ts_ms": TS, "model_version": 5,
                    "format": "onnx", "sha256_hex": hashlib.sha256(TINY_ONNX).hexdigest(), "classes": 3,
                    "inputs": {"accel": [1, 3]}, "input_names": ["accel"], "data_hex": TINY_ONNX.hex(),
                    "note": "a 201-byte ONNX classifier for the register vector's accel tokens (width 3 here); "
                            "sha256 is bin(32) of data; an edge that signs wraps this envelope (signed-prediction), "
                            "and one over the packet budget travels chunked (chunk-0-of-3)"},
        "hex": encode_envelope(Kind.MODEL, "edge-1", 13, model.to_body(), ts_ms=TS).hex(),
    })
    request = RegisterRequest("site-a", "edge-1")
    out.append({
        "name": "register-request",
        "topic": topics.register_request("site-a"),
        "meaning": {"kind": "register_request", "sender": "edge-1", "seq": 14, "ts_ms": TS, "site": "site-a",
                    "edge": "edge-1",
                    "note": "not retained; every device of site-a answers by publishing its registration again"},
        "hex": encode_envelope(Kind.REGISTER_REQUEST, "edge-1", 14, request.to_body(), ts_ms=TS).hex(),
    })
    receipt = Receipt("gw-7", 12, (9,))
    out.append({
        "name": "receipt",
        "topic": topics.device_down("site-a", "gw-7", topics.Downlink.RECEIPT),
        "meaning": {"kind": "receipt", "sender": "edge-1", "seq": 15, "ts_ms": TS, "device": "gw-7", "upto": 12,
                    "missing": [9],
                    "note": "edge-1's ingest log holds every features envelope of gw-7 with n <= 12 except n = 9 "
                            "(re-send it, same n); an edge that signs wraps it like signed-prediction"},
        "hex": encode_envelope(Kind.RECEIPT, "edge-1", 15, receipt.to_body(), ts_ms=TS).hex(),
    })
    return out


def _fixed_chunk(whole: bytes) -> str:
    import os

    real_urandom = os.urandom
    os.urandom = lambda n: bytes(range(n))  # deterministic transfer id for the published vector
    try:
        msgs = frames("t", whole, sender="gw-7", seq=10, max_packet=512, ts_ms=TS)
    finally:
        os.urandom = real_urandom
    return msgs[0][1].hex()


if __name__ == "__main__":
    path = Path(__file__).with_name("test_vectors.json")
    path.write_text(json.dumps(vectors(), indent=2) + "\n")
    print(f"wrote {path}")
