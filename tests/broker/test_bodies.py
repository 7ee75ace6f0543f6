"""Every message body: what ``to_body`` puts on the wire, that ``from_body`` reads it back, and the
typed error for each malformed field."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest

from broker.errors import ArrayFormatError, DecodeError, OversizeError, UnknownKindError, UnknownModalityError
from broker.wire import (
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
    ModelUpdate,
    Prediction,
    RegisterRequest,
    Rejection,
    SiteFeedback,
    decode_envelope,
    encode_array,
    encode_envelope,
    modality_of,
)
from broker.wire.adapters import decode_tensors, encode_tensors
from broker.wire.bodies import BODY_TYPES, decode_body
from broker.wire.receipt import Receipt
from tests.support.wire import raises_exactly


def _wire(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` as a receiver sees it: through msgpack and back (memoryviews become bytes)."""
    return msgpack.unpackb(msgpack.packb(body, use_bin_type=True), raw=False)


def _arr(a: np.ndarray) -> dict[str, Any]:
    return _wire(encode_array(a))


def _same_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes() for k in a
    )


# ---------------------------------------------------------------- decode_body dispatch


def test_each_kind_decodes_to_its_message_type() -> None:
    assert {k.value: t.__name__ for k, t in BODY_TYPES.items()} == {
        "features": "FeatureRecord", "features_batch": "FeatureBatch", "infer": "FeatureRecord",
        "register": "CapabilityProfile",
        "config": "DeviceConfig", "prediction": "Prediction", "feedback": "DeviceFeedback", "error": "ErrorReport",
        "adapter": "AdapterUpdate", "global": "GlobalAdapter", "site_feedback": "SiteFeedback",
        "model": "ModelUpdate", "register_request": "RegisterRequest", "receipt": "Receipt",
    }
    samples = {
        Kind.FEATURES: FeatureRecord("d", 1, {"imu": np.ones(2, np.float32)}),
        Kind.INFER: FeatureRecord("d", 2, {"imu": np.ones(2, np.float32)}),
        Kind.REGISTER: CapabilityProfile("d", {"imu": ModalityProfile((2,))}),
        Kind.CONFIG: DeviceConfig(["imu"]),
        Kind.PREDICTION: Prediction("d", 1, 0, np.array([1.0], np.float32)),
        Kind.FEEDBACK: DeviceFeedback(3),
        Kind.ERROR: ErrorReport("DecodeError", "bad"),
        Kind.ADAPTER: AdapterUpdate("e", "s", 1, 0, "fp", 1, 1.0, 1, {}, {}),
        Kind.MODEL: ModelUpdate(2, bytes(32), {"imu": (4, 6)}, ["imu"], 3, b"\x08\x01onnx"),
        Kind.GLOBAL: GlobalAdapter(1, "fp", "fedavg", 1, 1.0, {}),
        Kind.SITE_FEEDBACK: SiteFeedback("s", 1, 0, {}),
        Kind.REGISTER_REQUEST: RegisterRequest("s-1", "edge_1"),
        Kind.RECEIPT: Receipt("d", 9, (3, 5)),
    }
    for kind, msg in samples.items():
        env = decode_envelope(encode_envelope(kind, "x", 1, msg.to_body()))
        back = decode_body(env)
        assert type(back) is type(msg)
        assert msgpack.packb(back.to_body()) == msgpack.packb(_wire(msg.to_body()))


def test_model_bodies_are_maps_not_raw_bytes() -> None:
    """A bare file (what the first spec text allowed, and nobody sent) has no version or sha256 to check."""
    with raises_exactly(DecodeError, "model body must be a map"):
        decode_body(Envelope(Kind.MODEL, "e", 1, 0, "ct", b"\x08\x01onnx"))
    with raises_exactly(DecodeError, "missing field 'model_version'"):
        decode_body(Envelope(Kind.MODEL, "e", 1, 0, "ct", {"data": b"x"}))


def test_chunks_have_no_message_type() -> None:
    with raises_exactly(UnknownKindError, "no message type for kind 'chunk'"):
        decode_body(Envelope(Kind.CHUNK, "e", 1, 0, "ct", {}))


def test_body_errors_surface_through_decode_body() -> None:
    with raises_exactly(DecodeError, "feedback body must be a map"):
        decode_body(Envelope(Kind.FEEDBACK, "e", 1, 0, "ct", b"x"))
    with raises_exactly(DecodeError, "missing field 'code'"):
        decode_body(Envelope(Kind.ERROR, "e", 1, 0, "ct", {"message": "m"}))


@pytest.mark.parametrize(
    ("cls", "what"),
    [(FeatureRecord, "features"), (CapabilityProfile, "register"), (ModalityProfile, "modality profile"),
     (DeviceConfig, "config"), (Prediction, "prediction"), (DeviceFeedback, "feedback"), (ErrorReport, "error"),
     (AdapterUpdate, "adapter"), (GlobalAdapter, "global"), (SiteFeedback, "site_feedback")],
)
def test_non_map_body_names_its_message(cls: Any, what: str) -> None:
    with raises_exactly(DecodeError, f"{what} body must be a map"):
        cls.from_body([])


# ---------------------------------------------------------------- FeatureRecord

REC_BODY = {"device": "d1", "sample": 5, "modalities": {"imu": _arr(np.arange(6, dtype=np.float32).reshape(2, 3))}}


def test_feature_record_wire_form() -> None:
    rec = FeatureRecord("d1", np.int64(5), {"imu": np.arange(6, dtype=np.float32).reshape(2, 3)},
                        label=np.int64(0), quality={"snr": np.float32(3.5), "n": 2})
    body = _wire(rec.to_body())
    assert body == {**REC_BODY, "label": 0, "quality": {"snr": 3.5, "n": 2.0}}
    assert type(body["quality"]["n"]) is float
    assert list(rec.to_body()) == ["device", "sample", "modalities", "label", "quality"]
    # no label and no quality: the keys are left out, not sent as nil
    assert _wire(FeatureRecord("d1", 5, rec.modalities).to_body()) == REC_BODY
    with raises_exactly(UnknownModalityError):
        FeatureRecord("d1", 5, {"IMU": np.zeros(1)}).to_body()


def test_feature_record_reads_every_field() -> None:
    back = FeatureRecord.from_body({**REC_BODY, "label": 0, "quality": {"snr": 3, "q": 0.5}})
    assert (back.device, back.sample, back.label, back.quality) == ("d1", 5, 0, {"snr": 3.0, "q": 0.5})
    assert type(back.quality["snr"]) is float
    assert back.modalities["imu"].tolist() == [[0, 1, 2], [3, 4, 5]]
    plain = FeatureRecord.from_body(REC_BODY)
    assert (plain.label, plain.quality) == (None, {})
    assert FeatureRecord.from_body({**REC_BODY, "label": None, "quality": None}).label is None
    assert FeatureRecord.from_body({**REC_BODY, "quality": {}}).quality == {}
    assert FeatureRecord.from_body({**REC_BODY, "sample": 0}).sample == 0


def test_feature_record_limits() -> None:
    assert FeatureRecord.from_body(REC_BODY, max_array_bytes=24).modalities["imu"].shape == (2, 3)
    with raises_exactly(OversizeError, "array of 24 bytes exceeds the limit of 23"):
        FeatureRecord.from_body(REC_BODY, max_array_bytes=23)
    assert FeatureRecord.from_body(REC_BODY, allowed_modalities=frozenset({"imu"})).device == "d1"
    with raises_exactly(UnknownModalityError, "unknown modality 'imu'; expected one of ['audio']"):
        FeatureRecord.from_body(REC_BODY, allowed_modalities={"audio"})


MALFORMED_RECORDS: list[tuple[str, dict[str, Any], type[Exception], str | None]] = [
    ("no modalities", {"device": "d1", "sample": 5}, DecodeError, "missing field 'modalities'"),
    ("nil modalities", {**REC_BODY, "modalities": None}, DecodeError, "missing field 'modalities'"),
    ("modalities as list", {**REC_BODY, "modalities": [1]}, DecodeError, "field 'modalities' has the wrong type list"),
    ("empty modalities", {**REC_BODY, "modalities": {}}, UnknownModalityError,
     "a feature record needs at least one modality"),
    ("bad modality name", {**REC_BODY, "modalities": {"I-M-U": REC_BODY["modalities"]["imu"]}}, UnknownModalityError,
     None),
    ("bad array", {**REC_BODY, "modalities": {"imu": {"dtype": "<f4", "shape": [2], "data": b""}}}, ArrayFormatError,
     "dtype <f4 and shape [2] need 8 bytes, payload has 0"),
    ("no device", {k: v for k, v in REC_BODY.items() if k != "device"}, DecodeError, "missing field 'device'"),
    ("device as int", {**REC_BODY, "device": 1}, DecodeError, "field 'device' has the wrong type int"),
    ("no sample", {k: v for k, v in REC_BODY.items() if k != "sample"}, DecodeError, "missing field 'sample'"),
    ("negative sample", {**REC_BODY, "sample": -1}, DecodeError, "field 'sample' must be >= 0, got -1"),
    ("bool sample", {**REC_BODY, "sample": True}, DecodeError, "field 'sample' must be an integer"),
    ("float sample", {**REC_BODY, "sample": 5.0}, DecodeError, "field 'sample' has the wrong type float"),
    ("negative label", {**REC_BODY, "label": -1}, DecodeError, "field 'label' must be >= 0, got -1"),
    ("bool label", {**REC_BODY, "label": False}, DecodeError, "field 'label' must be an integer"),
    ("str label", {**REC_BODY, "label": "3"}, DecodeError, "field 'label' has the wrong type str"),
    ("quality as list", {**REC_BODY, "quality": [1.0]}, DecodeError, "field 'quality' has the wrong type list"),
    ("quality not finite", {**REC_BODY, "quality": {"snr": float("inf")}}, DecodeError, "quality['snr'] is not finite"),
    ("quality not numbers", {**REC_BODY, "quality": {"snr": "high"}}, DecodeError,
     "quality must map strings to numbers"),
]


@pytest.mark.parametrize(("body", "cls", "message"), [c[1:] for c in MALFORMED_RECORDS],
                         ids=[c[0] for c in MALFORMED_RECORDS])
def test_malformed_feature_records(body: dict[str, Any], cls: type[Exception], message: str | None) -> None:
    with raises_exactly(cls, message):
        FeatureRecord.from_body(body)


# ---------------------------------------------------------------- registration


def test_modality_profile() -> None:
    prof = ModalityProfile((10, 3), "<i2", 50)
    assert prof.to_body() == {"shape": [10, 3], "dtype": "<i2", "rate_hz": 50.0}
    assert type(prof.to_body()["rate_hz"]) is float
    assert ModalityProfile.from_body({"shape": [10, 3], "dtype": "<i2", "rate_hz": 50}) == prof
    assert ModalityProfile((4,)) == ModalityProfile((4,), "<f4", 1.0)
    back = ModalityProfile.from_body({"shape": [1], "dtype": "|b1", "rate_hz": 0.5})
    assert (back.shape, back.dtype, back.rate_hz) == ((1,), "|b1", 0.5)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"shape": [0], "dtype": "<f4", "rate_hz": 1.0}, "modality shape must be 1 to 8 positive ints, got [0]"),
        ({"shape": [3, -1], "dtype": "<f4", "rate_hz": 1.0},
         "modality shape must be 1 to 8 positive ints, got [3, -1]"),
        ({"shape": [True], "dtype": "<f4", "rate_hz": 1.0}, "modality shape must be 1 to 8 positive ints, got [True]"),
        ({"shape": [2.0], "dtype": "<f4", "rate_hz": 1.0}, "modality shape must be 1 to 8 positive ints, got [2.0]"),
        ({"shape": "3", "dtype": "<f4", "rate_hz": 1.0}, "field 'shape' has the wrong type str"),
        ({"dtype": "<f4", "rate_hz": 1.0}, "missing field 'shape'"),
        ({"shape": [3], "dtype": ">f4", "rate_hz": 1.0}, "unsupported dtype '>f4' in modality profile"),
        ({"shape": [3], "dtype": "float32", "rate_hz": 1.0}, "unsupported dtype 'float32' in modality profile"),
        ({"shape": [3], "rate_hz": 1.0}, "missing field 'dtype'"),
        ({"shape": [3], "dtype": "<f4"}, "missing field 'rate_hz'"),
        ({"shape": [3], "dtype": "<f4", "rate_hz": "fast"}, "field 'rate_hz' has the wrong type str"),
        # found by fuzzing: an empty shape has no token width (the edge read shape[-1] and crashed)
        ({"shape": [], "dtype": "<f4", "rate_hz": 1.0}, "modality shape must be 1 to 8 positive ints, got []"),
        ({"shape": [1] * 9, "dtype": "<f4", "rate_hz": 1.0},
         f"modality shape must be 1 to 8 positive ints, got {[1] * 9}"),
        ({"shape": [2**32, 2**32], "dtype": "<f4", "rate_hz": 1.0},
         f"modality shape must be 1 to 8 positive ints, got {[2**32, 2**32]}"),
        # a rate the device cannot read back from its DeviceConfig (number_map refuses non-finite values)
        ({"shape": [3], "dtype": "<f4", "rate_hz": float("nan")}, "field 'rate_hz' must be finite, got nan"),
        ({"shape": [3], "dtype": "<f4", "rate_hz": float("inf")}, "field 'rate_hz' must be finite, got inf"),
        ({"shape": [3], "dtype": "<f4", "rate_hz": -1.0}, "field 'rate_hz' must be >= 0, got -1.0"),
    ],
)
def test_malformed_modality_profiles(body: dict[str, Any], message: str) -> None:
    with raises_exactly(DecodeError, message):
        ModalityProfile.from_body(body)


def test_capability_profile() -> None:
    prof = CapabilityProfile("d", {"imu": ModalityProfile((2, 3), "<f4", 5.0)}, {"ram_mb": 64, "mhz": 80.5}, "1.2")
    body = prof.to_body()
    assert _wire(body) == {"device": "d", "modalities": {"imu": {"shape": [2, 3], "dtype": "<f4", "rate_hz": 5.0}},
                           "compute": {"ram_mb": 64.0, "mhz": 80.5}, "sdk": "1.2"}
    assert type(body["compute"]["ram_mb"]) is float
    back = CapabilityProfile.from_body(_wire(body))
    assert back == CapabilityProfile("d", {"imu": ModalityProfile((2, 3), "<f4", 5.0)}, {"ram_mb": 64.0, "mhz": 80.5},
                                     "1.2")
    minimal = CapabilityProfile.from_body({"device": "d", "modalities": {"imu": {"shape": [1], "dtype": "<f4",
                                                                                   "rate_hz": 1}}})
    assert (minimal.compute, minimal.sdk_version) == ({}, "")
    assert CapabilityProfile("d", {}).to_body() == {"device": "d", "modalities": {}, "compute": {}, "sdk": ""}
    with raises_exactly(UnknownModalityError):
        CapabilityProfile("d", {"Bad": ModalityProfile((1,))}).to_body()


@pytest.mark.parametrize(
    ("body", "cls", "message"),
    [
        ({"device": "d", "modalities": {}}, UnknownModalityError, "a capability profile needs at least one modality"),
        ({"device": "d"}, DecodeError, "missing field 'modalities'"),
        ({"modalities": {"imu": {"shape": [1], "dtype": "<f4", "rate_hz": 1}}}, DecodeError, "missing field 'device'"),
        ({"device": "d", "modalities": {"IMU": {"shape": [1], "dtype": "<f4", "rate_hz": 1}}}, UnknownModalityError,
         None),
        ({"device": "d", "modalities": {"imu": [1]}}, DecodeError, "modality profile body must be a map"),
        ({"device": "d", "modalities": {"imu": {"shape": [1], "dtype": "<f4", "rate_hz": 1}}, "compute": {"x": "y"}},
         DecodeError, "compute must map strings to numbers"),
        ({"device": "d", "modalities": {"imu": {"shape": [1], "dtype": "<f4", "rate_hz": 1}}, "sdk": 1}, DecodeError,
         "field 'sdk' has the wrong type int"),
    ],
)
def test_malformed_capability_profiles(body: dict[str, Any], cls: type[Exception], message: str | None) -> None:
    with raises_exactly(cls, message):
        CapabilityProfile.from_body(body)


# ---------------------------------------------------------------- what a device receives


def test_device_config() -> None:
    cfg = DeviceConfig(["imu", "env"], {"imu": 50, "env": 0.5}, {"imu": (4, 6), "env": (8,)}, np.int64(3))
    body = cfg.to_body()
    assert body == {"modalities": ["imu", "env"], "rate_hz": {"imu": 50.0, "env": 0.5},
                    "shapes": {"imu": [4, 6], "env": [8]}, "model_version": 3}
    assert type(body["rate_hz"]["imu"]) is float and type(body["model_version"]) is int
    back = DeviceConfig.from_body(_wire(body))
    assert back == DeviceConfig(["imu", "env"], {"imu": 50.0, "env": 0.5}, {"imu": (4, 6), "env": (8,)}, 3)
    assert DeviceConfig.from_body({"modalities": ["imu"], "shapes": {"imu": [1, 1]}}).shapes == {"imu": (1, 1)}
    minimal = DeviceConfig.from_body({"modalities": []})
    assert minimal == DeviceConfig([], {}, {}, 0)
    assert DeviceConfig.from_body({"modalities": ["imu"], "model_version": None}).model_version == 0
    with raises_exactly(UnknownModalityError):
        DeviceConfig(["Imu"]).to_body()


@pytest.mark.parametrize(
    ("body", "cls", "message"),
    [
        ({}, DecodeError, "missing field 'modalities'"),
        ({"modalities": "imu"}, DecodeError, "field 'modalities' has the wrong type str"),
        ({"modalities": ["IMU"]}, UnknownModalityError, None),
        ({"modalities": [3]}, UnknownModalityError, None),
        ({"modalities": ["imu"], "rate_hz": {"imu": "fast"}}, DecodeError, "rate_hz must map strings to numbers"),
        ({"modalities": ["imu"], "shapes": {"IMU": [2]}}, UnknownModalityError, None),
        ({"modalities": ["imu"], "shapes": {"imu": "12"}}, DecodeError,
         "config shape of 'imu' must be a list of 1 to 8 positive ints, got '12'"),
        ({"modalities": ["imu"], "shapes": {"imu": 4}}, DecodeError,
         "config shape of 'imu' must be a list of 1 to 8 positive ints, got 4"),
        ({"modalities": ["imu"], "shapes": {"imu": [4, 2.5]}}, DecodeError,
         "config shape of 'imu' must be a list of 1 to 8 positive ints, got [4, 2.5]"),
        ({"modalities": ["imu"], "shapes": {"imu": [0]}}, DecodeError,
         "config shape of 'imu' must be a list of 1 to 8 positive ints, got [0]"),
        ({"modalities": ["imu"], "shapes": {"imu": [True]}}, DecodeError,
         "config shape of 'imu' must be a list of 1 to 8 positive ints, got [True]"),
        ({"modalities": ["imu"], "model_version": -1}, DecodeError, "field 'model_version' must be >= 0, got -1"),
        ({"modalities": ["imu"], "shapes": {"imu": []}}, DecodeError,
         "config shape of 'imu' must be a list of 1 to 8 positive ints, got []"),
    ],
)
def test_malformed_device_configs(body: dict[str, Any], cls: type[Exception], message: str | None) -> None:
    with raises_exactly(cls, message):
        DeviceConfig.from_body(body)


def test_prediction() -> None:
    pred = Prediction("d", np.int64(7), np.int64(2), [0.25, 0.75], 4)
    body = pred.to_body()
    assert _wire(body) == {"device": "d", "sample": 7, "label": 2, "model_version": 4,
                           "probs": {"dtype": "<f4", "shape": [2], "data": np.array([0.25, 0.75], "<f4").tobytes()}}
    back = Prediction.from_body(_wire(body))
    assert (back.device, back.sample, back.label, back.model_version) == ("d", 7, 2, 4)
    assert back.probs.dtype == np.float32 and back.probs.tolist() == [0.25, 0.75]
    # probabilities always travel as float32, whatever the edge computed them in
    assert Prediction("d", 1, 0, np.array([1.0], np.float64)).to_body()["probs"]["dtype"] == "<f4"
    no_version = {k: v for k, v in _wire(body).items() if k != "model_version"}
    assert Prediction.from_body(no_version).model_version == 0


@pytest.mark.parametrize(
    ("change", "cls", "message"),
    [
        ({"device": None}, DecodeError, "missing field 'device'"),
        ({"sample": -1}, DecodeError, "field 'sample' must be >= 0, got -1"),
        ({"label": "x"}, DecodeError, "field 'label' has the wrong type str"),
        ({"label": -1}, DecodeError, "field 'label' must be >= 0, got -1"),
        ({"probs": None}, DecodeError, "missing field 'probs'"),
        ({"probs": [0.5]}, DecodeError, "field 'probs' has the wrong type list"),
        ({"probs": {"dtype": "<f4", "shape": [3], "data": b""}}, ArrayFormatError, None),
        ({"model_version": True}, DecodeError, "field 'model_version' must be an integer"),
    ],
)
def test_malformed_predictions(change: dict[str, Any], cls: type[Exception], message: str | None) -> None:
    body = {**_wire(Prediction("d", 7, 2, np.array([0.5, 0.5])).to_body()), **change}
    with raises_exactly(cls, message):
        Prediction.from_body(body)


def test_device_feedback() -> None:
    fb = DeviceFeedback(np.int64(4), {"acc": np.float32(0.5)}, "served by v4")
    assert fb.to_body() == {"global_version": 4, "metrics": {"acc": 0.5}, "message": "served by v4"}
    assert type(fb.to_body()["global_version"]) is int
    assert DeviceFeedback.from_body(_wire(fb.to_body())) == DeviceFeedback(4, {"acc": 0.5}, "served by v4")
    assert DeviceFeedback.from_body({"global_version": 0}) == DeviceFeedback(0, {}, "")
    assert DeviceFeedback(1).to_body() == {"global_version": 1, "metrics": {}, "message": ""}
    for body, message in [
        ({}, "missing field 'global_version'"),
        ({"global_version": -1}, "field 'global_version' must be >= 0, got -1"),
        ({"global_version": 1, "metrics": {"acc": "high"}}, "metrics must map strings to numbers"),
        ({"global_version": 1, "metrics": {"acc": float("nan")}}, "metrics['acc'] is not finite"),
        ({"global_version": 1, "message": 3}, "field 'message' has the wrong type int"),
    ]:
        with raises_exactly(DecodeError, message):
            DeviceFeedback.from_body(body)


def test_error_report() -> None:
    rep = ErrorReport("ArrayFormatError", "need 24 bytes", np.int64(9))
    assert rep.to_body() == {"code": "ArrayFormatError", "message": "need 24 bytes", "ref": 9}
    assert type(rep.to_body()["ref"]) is int
    assert ErrorReport.from_body(rep.to_body()) == ErrorReport("ArrayFormatError", "need 24 bytes", 9)
    assert ErrorReport("C", "m").to_body() == {"code": "C", "message": "m"}  # no ref: left out, not nil
    assert ErrorReport("C", "m", 0).to_body() == {"code": "C", "message": "m", "ref": 0}
    assert ErrorReport.from_body({"code": "C", "message": "m"}) == ErrorReport("C", "m", None)
    for body, message in [
        ({"message": "m"}, "missing field 'code'"),
        ({"code": "C"}, "missing field 'message'"),
        ({"code": 1, "message": "m"}, "field 'code' has the wrong type int"),
        ({"code": "C", "message": "m", "ref": -1}, "field 'ref' must be >= 0, got -1"),
        ({"code": "C", "message": "m", "ref": "9"}, "field 'ref' has the wrong type str"),
    ]:
        with raises_exactly(DecodeError, message):
            ErrorReport.from_body(body)


# ---------------------------------------------------------------- adapters

TENSORS = {
    "base_model.model.encoder.layer.0.query.lora_A.weight": np.arange(8, dtype=np.float16).reshape(2, 4),
    "base_model.model.modality_proj.audio.lora_B.weight": np.ones((4, 2), np.float32),
}


@pytest.mark.parametrize(
    ("name", "modality"),
    [
        ("base_model.model.modality_proj.audio.lora_B.weight", "audio"),
        ("modality_proj.imu_2.lora_A.weight", "imu_2"),
        ("x.modality_proj.env.y.modality_proj.imu.z", "env"),
        ("base_model.model.encoder.lora_A.weight", None),
        ("xmodality_proj.audio.lora_A.weight", None),
        ("a.modality_proj.Audio.lora_A.weight", None),
        ("a.modality_proj.audio", None),
    ],
)
def test_modality_of(name: str, modality: str | None) -> None:
    assert modality_of(name) == modality


def test_tensor_maps() -> None:
    enc = encode_tensors(TENSORS)
    assert list(enc) == list(TENSORS) and all(set(v) == {"dtype", "shape", "data"} for v in enc.values())
    assert _same_arrays(decode_tensors(_wire(enc)), TENSORS)
    assert decode_tensors({}) == {}
    assert _same_arrays(decode_tensors(_wire(enc), max_array_bytes=32), TENSORS)
    with raises_exactly(OversizeError, "array of 32 bytes exceeds the limit of 31"):
        decode_tensors(_wire(enc), max_array_bytes=31)
    with raises_exactly(DecodeError, "tensors must be a map of name to array"):
        decode_tensors([enc])
    for bad in ({"": _arr(np.zeros(1))}, {3: _arr(np.zeros(1))}):
        with raises_exactly(DecodeError, "tensor names must be non-empty strings"):
            decode_tensors(bad)
    with raises_exactly(ArrayFormatError):
        decode_tensors({"w": {"dtype": "<f4"}})


def _update(**over: Any) -> AdapterUpdate:
    kw: dict[str, Any] = dict(edge="e1", site="s1", seq=3, base_version=2, base_model="fp", rank=1, alpha=8.0,
                              samples=100, modalities={"audio": 60, "imu": 0}, tensors=TENSORS,
                              metrics={"acc": 0.5})
    kw.update(over)
    return AdapterUpdate(**kw)


def test_adapter_update() -> None:
    # numpy scalars (what training code hands over) become plain msgpack numbers
    up = _update(seq=np.int64(3), alpha=np.float32(8.0), samples=np.int64(100),
                 modalities={"audio": np.int64(60), "imu": 0}, metrics={"acc": np.float32(0.5)})
    body = up.to_body()
    assert list(body) == ["edge", "site", "seq", "base_version", "base_model", "rank", "alpha", "samples",
                          "modalities", "metrics", "tensors"]
    wire = _wire(body)
    assert {k: v for k, v in wire.items() if k != "tensors"} == {
        "edge": "e1", "site": "s1", "seq": 3, "base_version": 2, "base_model": "fp", "rank": 1, "alpha": 8.0,
        "samples": 100, "modalities": {"audio": 60, "imu": 0}, "metrics": {"acc": 0.5}}
    back = AdapterUpdate.from_body(wire)
    assert (back.edge, back.site, back.seq, back.base_version, back.base_model, back.rank, back.alpha,
            back.samples, back.modalities, back.metrics) == ("e1", "s1", 3, 2, "fp", 1, 8.0, 100,
                                                             {"audio": 60, "imu": 0}, {"acc": 0.5})
    assert _same_arrays(back.tensors, TENSORS)
    no_metrics = AdapterUpdate.from_body({k: v for k, v in wire.items() if k != "metrics"})
    assert no_metrics.metrics == {}
    assert AdapterUpdate("e", "s", 1, 0, "fp", 1, 1.0, 1, {}, {}).metrics == {}


@pytest.mark.parametrize(
    ("change", "cls", "message"),
    [
        ({"edge": None}, DecodeError, "missing field 'edge'"),
        ({"site": 1}, DecodeError, "field 'site' has the wrong type int"),
        ({"seq": -1}, DecodeError, "field 'seq' must be >= 0, got -1"),
        ({"base_version": "2"}, DecodeError, "field 'base_version' has the wrong type str"),
        ({"base_model": None}, DecodeError, "missing field 'base_model'"),
        ({"rank": 0}, DecodeError, "field 'rank' must be >= 1, got 0"),
        ({"alpha": True}, DecodeError, "field 'alpha' must be a number"),
        ({"alpha": 0.0}, DecodeError, "field 'alpha' must be > 0, got 0.0"),
        ({"alpha": float("nan")}, DecodeError, "field 'alpha' must be finite, got nan"),
        ({"samples": -5}, DecodeError, "field 'samples' must be >= 0, got -5"),
        ({"modalities": None}, DecodeError, "missing field 'modalities'"),
        ({"modalities": {"audio": -1}}, DecodeError, "modalities['audio'] must be a non-negative integer"),
        ({"modalities": {"Audio": 1}}, UnknownModalityError, None),
        ({"metrics": {"acc": float("inf")}}, DecodeError, "metrics['acc'] is not finite"),
        ({"tensors": None}, DecodeError, "missing field 'tensors'"),
        ({"tensors": {"": {}}}, DecodeError, "tensor names must be non-empty strings"),
    ],
)
def test_malformed_adapter_updates(change: dict[str, Any], cls: type[Exception], message: str | None) -> None:
    with raises_exactly(cls, message):
        AdapterUpdate.from_body({**_wire(_update().to_body()), **change})


def test_global_adapter() -> None:
    g = GlobalAdapter(np.int64(5), "fp", "fedavg", 1, np.float64(16.0), TENSORS, ["e1", "e2"])
    body = g.to_body()
    assert list(body) == ["version", "base_model", "strategy", "rank", "alpha", "contributors", "tensors"]
    wire = _wire(body)
    assert {k: v for k, v in wire.items() if k != "tensors"} == {
        "version": 5, "base_model": "fp", "strategy": "fedavg", "rank": 1, "alpha": 16.0,
        "contributors": ["e1", "e2"]}
    back = GlobalAdapter.from_body(wire)
    assert (back.version, back.base_model, back.strategy, back.rank, back.alpha, back.contributors) == (
        5, "fp", "fedavg", 1, 16.0, ["e1", "e2"])
    assert _same_arrays(back.tensors, TENSORS)
    assert GlobalAdapter.from_body({k: v for k, v in wire.items() if k != "contributors"}).contributors == []
    assert GlobalAdapter(1, "fp", "x", 1, 1.0, {}).contributors == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"contributors": ["e1", 2]}, "contributors must be strings"),
        ({"contributors": [None]}, "contributors must be strings"),
        ({"contributors": "e1"}, "field 'contributors' has the wrong type str"),
        ({"version": -1}, "field 'version' must be >= 0, got -1"),
        ({"strategy": None}, "missing field 'strategy'"),
        ({"base_model": 3}, "field 'base_model' has the wrong type int"),
        ({"rank": 0}, "field 'rank' must be >= 1, got 0"),
        ({"alpha": "16"}, "field 'alpha' has the wrong type str"),
        # found by fuzzing the edge: alpha 0 made the edge divide by a zero LoRA scaling (ZeroDivisionError)
        ({"alpha": 0}, "field 'alpha' must be > 0, got 0.0"),
        ({"alpha": -16.0}, "field 'alpha' must be > 0, got -16.0"),
        ({"alpha": float("inf")}, "field 'alpha' must be finite, got inf"),
        ({"tensors": None}, "missing field 'tensors'"),
    ],
)
def test_malformed_global_adapters(change: dict[str, Any], message: str) -> None:
    wire = _wire(GlobalAdapter(5, "fp", "fedavg", 2, 16.0, TENSORS, ["e1"]).to_body())
    with raises_exactly(DecodeError, message):
        GlobalAdapter.from_body({**wire, **change})


def test_site_feedback() -> None:
    fb = SiteFeedback("s1", np.int64(6), 0, TENSORS, {"drift": np.float32(0.25)}, [np.int64(3), 4],
                      [Rejection(np.int64(5), "stale base"), Rejection(7, "not finite")])
    body = fb.to_body()
    assert list(body) == ["site", "version", "rank", "stats", "accepted", "rejected", "tensors"]
    wire = _wire(body)
    assert {k: v for k, v in wire.items() if k != "tensors"} == {
        "site": "s1", "version": 6, "rank": 0, "stats": {"drift": 0.25}, "accepted": [3, 4],
        "rejected": [{"seq": 5, "reason": "stale base"}, {"seq": 7, "reason": "not finite"}]}
    back = SiteFeedback.from_body(wire)
    assert (back.site, back.version, back.rank, back.stats, back.accepted) == ("s1", 6, 0, {"drift": 0.25}, [3, 4])
    assert back.rejected == [Rejection(5, "stale base"), Rejection(7, "not finite")]
    assert _same_arrays(back.tensors, TENSORS)
    minimal = SiteFeedback.from_body({"site": "s1", "version": 1, "rank": 2})
    assert minimal == SiteFeedback("s1", 1, 2, {}, {}, [], [])
    assert SiteFeedback("s", 1, 1, {}).to_body() == {"site": "s", "version": 1, "rank": 1, "stats": {},
                                                     "accepted": [], "rejected": [], "tensors": {}}


def test_rejection_wire_form() -> None:
    r = Rejection(np.int64(4), "duplicate")
    assert r.to_body() == {"seq": 4, "reason": "duplicate"} and type(r.to_body()["seq"]) is int


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"accepted": [1, "2"]}, "accepted must be a list of sequence numbers"),
        ({"accepted": [True]}, "accepted must be a list of sequence numbers"),
        ({"accepted": [1.0]}, "accepted must be a list of sequence numbers"),
        ({"accepted": 3}, "field 'accepted' has the wrong type int"),
        ({"rejected": [[5, "why"]]}, "rejection body must be a map"),
        ({"rejected": [{"seq": 5}]}, "missing field 'reason'"),
        ({"rejected": [{"reason": "x"}]}, "missing field 'seq'"),
        ({"rejected": [{"seq": -5, "reason": "x"}]}, "field 'seq' must be >= 0, got -5"),
        ({"rejected": {"seq": 5, "reason": "x"}}, "field 'rejected' has the wrong type dict"),
        ({"site": None}, "missing field 'site'"),
        ({"version": -1}, "field 'version' must be >= 0, got -1"),
        ({"rank": -1}, "field 'rank' must be >= 0, got -1"),
        ({"stats": {"x": "y"}}, "stats must map strings to numbers"),
        ({"tensors": []}, "field 'tensors' has the wrong type list"),
    ],
)
def test_malformed_site_feedback(change: dict[str, Any], message: str) -> None:
    wire = _wire(SiteFeedback("s1", 6, 2, TENSORS, {"d": 1.0}, [1], [Rejection(2, "r")]).to_body())
    with raises_exactly(DecodeError, message):
        SiteFeedback.from_body({**wire, **change})
