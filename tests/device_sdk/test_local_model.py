"""The device's model store and runner on real onnxruntime and real files (``device_sdk.local_model``).

Models are built with ``onnx.helper`` (tests/support/onnx_models.py) and every expected output is computed with
numpy from the same weights, never by the code under test. Each refusal must be its typed error, counted, and
leave the model in use predicting exactly as before, with the files on disk byte for byte unchanged.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from broker.wire import CapabilityProfile, FeatureRecord, ModalityProfile, ModelUpdate, decode_envelope
from broker.wire.bodies import decode_body
from device_sdk import files, local_model
from device_sdk.local_model import (
    LocalModel,
    ModelCorruptError,
    ModelFormatError,
    ModelHashError,
    ModelInputError,
    ModelProfileError,
    ModelRejectedError,
    ModelShapeError,
    ModelStorageError,
    StaleModelError,
)
from tests.support.onnx_models import build, reference, update

INPUTS = {"imu": (4, 6), "env": (1, 8)}
PROFILE = CapabilityProfile("d1", {"imu": ModalityProfile((4, 6)), "env": ModalityProfile((8,))})
RNG = np.random.default_rng(7)
SAMPLES = [{"imu": RNG.normal(size=(3, 6)).astype(np.float32), "env": RNG.normal(size=8).astype(np.float32)},
           {"imu": RNG.normal(size=(9, 6)).astype(np.float32)},  # longer than 4 tokens: the newest 4 are used
           {"env": RNG.normal(size=(1, 8)).astype(np.float32)}]


def _files(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def _installed(tmp_path: Path, *, masks: bool = True, seed: int = 1) -> LocalModel:
    model = LocalModel(tmp_path / "m", PROFILE)
    assert model.install(update(build(INPUTS, 4, seed=seed, masks=masks), INPUTS, 4, 1))
    return model


@pytest.mark.parametrize("masks", [False, True], ids=["features-only", "masks-and-presence"])
def test_install_then_predict_matches_numpy(tmp_path: Path, masks: bool) -> None:
    model = _installed(tmp_path, masks=masks)
    assert model.version == 1 and model.counters["model_version"] == 1 and model.counters["model_installed"] == 1
    for sample in SAMPLES:
        label, probs = model.predict(sample)
        want = reference(sample, INPUTS, 4, seed=1, masks=masks)
        assert np.allclose(probs, want, atol=1e-5) and label == int(np.argmax(want))
    rec = FeatureRecord("d1", 42, SAMPLES[0])
    pred = model.prediction(rec)
    assert pred is not None and (pred.device, pred.sample, pred.model_version) == ("d1", 42, 1)
    assert np.allclose(pred.probs, reference(SAMPLES[0], INPUTS, 4, seed=1, masks=masks), atol=1e-5)
    meta = json.loads((tmp_path / "m" / "current.json").read_text())
    assert meta["previous"] is None and meta["current"]["model_version"] == 1
    assert (tmp_path / "m" / meta["current"]["file"]).read_bytes() == build(INPUTS, 4, seed=1, masks=masks)


def test_records_the_model_cannot_read_are_refused_not_guessed(tmp_path: Path) -> None:
    model = _installed(tmp_path)
    for bad, text in [({"gps": np.zeros(2)}, "does not read ['gps']"),
                      ({"imu": np.zeros((2, 5))}, "the model takes [tokens, 6]"),
                      ({"imu": np.full((2, 6), np.nan)}, "NaN or infinite"),
                      ({}, "at least one of")]:
        with pytest.raises(ModelInputError, match=text.replace("[", r"\[").replace("]", r"\]")):
            model.predict(bad)
    with pytest.raises(LookupError):
        LocalModel(tmp_path / "empty", PROFILE).predict(SAMPLES[0])
    assert LocalModel(tmp_path / "empty2", PROFILE).prediction(FeatureRecord("d1", 1, SAMPLES[0])) is None


def _bad_models() -> dict[str, tuple[type[ModelRejectedError], ModelUpdate]]:
    good = build(INPUTS, 4, seed=2, masks=True)
    truncated = good[: len(good) // 2]
    wide = {"imu": (4, 5), "env": (1, 8)}
    return {
        "truncated": (ModelCorruptError, update(truncated, INPUTS, 4, 2, input_names=["imu", "imu_mask"])),
        "garbage": (ModelCorruptError, update(b"\x08\x07not a model at all", INPUTS, 4, 2,
                                              input_names=["imu", "imu_mask"])),
        "wrong sha256": (ModelHashError, update(good, INPUTS, 4, 2, sha256=hashlib.sha256(b"other").digest())),
        "bytes altered": (ModelHashError, replace(update(good, INPUTS, 4, 2), data=good[:-1] + bytes([good[-1] ^ 1]))),
        "profile mismatch": (ModelProfileError, update(build(wide, 4, masks=True), wide, 4, 2)),
        "no shared modality": (ModelProfileError, update(build({"gps": (1, 2)}, 4), {"gps": (1, 2)}, 4, 2)),
        "graph shape differs": (ModelShapeError, update(build(INPUTS, 4, masks=True, declared={"imu": (5, 6)}),
                                                        INPUTS, 4, 2)),
        "output width differs": (ModelShapeError, update(build(INPUTS, 5, masks=True), INPUTS, 4, 2)),
        "classes differ": (ModelShapeError, update(good, INPUTS, 3, 2)),
        "input names differ": (ModelShapeError, update(good, INPUTS, 4, 2, input_names=["imu", "env"])),
        "stale version": (StaleModelError, update(build(INPUTS, 4, seed=3), INPUTS, 4, 0)),
        "same version, other bytes": (StaleModelError, update(build(INPUTS, 4, seed=3), INPUTS, 4, 1)),
        "format": (ModelFormatError, update(good, INPUTS, 4, 2, format="tflite")),
    }


WHY = {  # what each refusal says (the class alone does not tell an operator which check failed, or on what)
    "truncated": r"^onnxruntime cannot load the model: \w+",
    "garbage": r"^onnxruntime cannot load the model: \w+",
    "wrong sha256": r"^model v2: bytes hash to [0-9a-f]{16}\.\.\., the message says",
    "bytes altered": r"^model v2: bytes hash to [0-9a-f]{16}\.\.\., the message says",
    "profile mismatch": r"imu",
    "no shared modality": r"gps",
    "graph shape differs": r"^input 'imu' is tensor\(float\) \[.*5, 6\]; the model announces features \[None, 4, 6\]$",
    "output width differs": r"^output 0 must be \[batch, 4\] probabilities$",
    "classes differ": r"^output 0 must be \[batch, 3\] probabilities$",
    "input names differ": r"^the graph's inputs \[.*'imu_mask'.*\] are not the announced \['env', 'imu'\]$",
    "stale version": r"^model v0 is not newer than v1 in use$",
    "same version, other bytes": r"^model v1 is not newer than v1 in use$",
    "format": r"^model format 'tflite' is not onnx$",
}


@pytest.mark.parametrize("case", list(_bad_models()))
def test_a_bad_model_is_refused_typed_and_counted_and_the_last_good_one_keeps_predicting(
        tmp_path: Path, case: str) -> None:
    model = _installed(tmp_path)
    before = _files(tmp_path / "m")
    expected = [model.predict(s)[1] for s in SAMPLES]
    error, msg = _bad_models()[case]
    with pytest.raises(error) as info:
        model.install(msg)
    assert type(info.value) is error and re.search(WHY[case], str(info.value)), str(info.value)
    assert model.offer(msg) is False  # the SDK's path: counted, not raised
    assert model.counters[f"rejected.{error.__name__}"] == 1 and model.counters[f"model_rejected.{error.reason}"] == 1
    assert model.version == 1 and model.counters["model_version"] == 1
    assert all(np.array_equal(model.predict(s)[1], e) for s, e in zip(SAMPLES, expected, strict=True))
    assert _files(tmp_path / "m") == before  # nothing written, nothing half-written
    assert LocalModel(tmp_path / "m", PROFILE).version == 1


def test_a_newer_model_replaces_the_old_one_and_the_same_one_again_changes_nothing(tmp_path: Path) -> None:
    model = _installed(tmp_path)
    v2 = update(build(INPUTS, 4, seed=5, masks=True), INPUTS, 4, 2)
    assert model.install(v2) and model.version == 2
    assert np.allclose(model.predict(SAMPLES[0])[1], reference(SAMPLES[0], INPUTS, 4, seed=5, masks=True), atol=1e-5)
    assert model.offer(v2) is False and model.counters["model_unchanged"] == 1 and model.counters["rejected"] == 0
    meta = json.loads((tmp_path / "m" / "current.json").read_text())
    assert (meta["current"]["model_version"], meta["previous"]["model_version"]) == (2, 1)
    assert sorted(p.name for p in (tmp_path / "m").glob("model-*.onnx")) == sorted(
        [meta["current"]["file"], meta["previous"]["file"]])
    assert model.install(update(build(INPUTS, 4, seed=6, masks=True), INPUTS, 4, 3))
    assert len(list((tmp_path / "m").glob("model-*.onnx"))) == 2  # the oldest is pruned: current and previous


def test_a_restart_comes_back_with_the_last_good_model(tmp_path: Path) -> None:
    _installed(tmp_path, seed=4)
    again = LocalModel(tmp_path / "m", PROFILE)
    assert again.version == 1 and again.counters["model_version"] == 1
    assert np.allclose(again.predict(SAMPLES[1])[1], reference(SAMPLES[1], INPUTS, 4, seed=4, masks=True), atol=1e-5)


def test_torn_writes_and_edited_files_are_never_loaded(tmp_path: Path) -> None:
    model = _installed(tmp_path, seed=1)
    assert model.install(update(build(INPUTS, 4, seed=2, masks=True), INPUTS, 4, 2))
    d = tmp_path / "m"
    # what a crash mid-write leaves: temporary files, never read, removed at start
    (d / "model-3-0000000000000000.onnx.tmp").write_bytes(b"\x08\x08half a mod")
    (d / "current.json.tmp").write_text('{"current": {"file": "model-3-0000000000000000.onnx.tmp"')
    restarted = LocalModel(d, PROFILE)
    assert restarted.version == 2 and restarted.counters["model_disk.leftover_tmp"] == 2
    assert not list(d.glob("*.tmp"))
    # the current file edited on disk: its sha256 no longer matches, so the previous model is used (rollback)
    current = d / json.loads((d / "current.json").read_text())["current"]["file"]
    blob = bytearray(current.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    current.write_bytes(bytes(blob))
    rolled = LocalModel(d, PROFILE)
    assert rolled.version == 1 and rolled.counters["model_disk.sha256"] == 1 and rolled.counters["model_disk.rollback"]
    assert np.allclose(rolled.predict(SAMPLES[0])[1], reference(SAMPLES[0], INPUTS, 4, seed=1, masks=True), atol=1e-5)
    # the edge can then send v2 again: the device is at v1
    assert rolled.install(update(build(INPUTS, 4, seed=2, masks=True), INPUTS, 4, 2)) and rolled.version == 2
    # both files bad: no model at all (the device asks its edge), never a half-checked one
    for f in d.glob("model-*.onnx"):
        f.write_bytes(f.read_bytes()[:-3])
    none = LocalModel(d, PROFILE)
    assert none.version is None and none.counters["model_disk.sha256"] == 2
    (d / "current.json").write_text("{not json")
    assert LocalModel(d, PROFILE).counters["model_disk.bad_meta"] == 1


def test_a_crash_between_writing_the_file_and_committing_it_keeps_the_old_model(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _installed(tmp_path, seed=1)
    real = local_model.write_atomic

    def fail_on_commit(path: Path, data: bytes) -> None:
        if path.name == "current.json":
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(local_model, "write_atomic", fail_on_commit)
    with pytest.raises(ModelStorageError):
        model.install(update(build(INPUTS, 4, seed=2, masks=True), INPUTS, 4, 2))
    assert model.version == 1
    monkeypatch.undo()
    again = LocalModel(tmp_path / "m", PROFILE)
    assert again.version == 1
    assert np.allclose(again.predict(SAMPLES[0])[1], reference(SAMPLES[0], INPUTS, 4, seed=1, masks=True), atol=1e-5)


def test_a_new_profile_the_model_does_not_fit_stops_using_it(tmp_path: Path) -> None:
    model = _installed(tmp_path)
    model.set_profile(CapabilityProfile("d1", {"imu": ModalityProfile((4, 6))}))
    assert model.version == 1  # still fits: imu is shared with the same width
    model.set_profile(CapabilityProfile("d1", {"imu": ModalityProfile((4, 9))}))
    assert model.version is None and model.counters["model_version"] == -1


def test_the_spec_vector_model_runs_on_the_device(tmp_path: Path) -> None:
    vectors = json.loads((Path(__file__).parents[2] / "docs/wire/test_vectors.json").read_text())
    vec = next(v for v in vectors if v["name"] == "model")
    msg: Any = decode_body(decode_envelope(bytes.fromhex(vec["hex"])))
    model = LocalModel(tmp_path / "v", CapabilityProfile("gw-7", {"accel": ModalityProfile((1, 3))}))
    assert model.install(msg) and model.version == 5
    x = np.array([0.5, -1.0, 2.0])
    label, probs = model.predict({"accel": x})
    assert np.allclose(probs, np.exp(x) / np.exp(x).sum(), atol=1e-6) and label == 2


def test_the_spec_table_names_each_refusal_class_and_reason() -> None:
    spec = (Path(__file__).parents[2] / "docs/wire/SPEC.md").read_text()
    rows = dict(re.findall(r"\| `(Model\w+Error|StaleModelError)`, `(\w+)` \|", spec))
    classes = {c.__name__: c.reason for c in (ModelFormatError, StaleModelError, ModelHashError, ModelProfileError,
                                               ModelCorruptError, ModelShapeError, ModelStorageError)}
    assert rows == classes


class _TornFile:
    """A file whose write stops halfway and fails, as a power cut leaves it."""

    def __init__(self, f: Any) -> None:
        self.f = f

    def __enter__(self) -> _TornFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.f.close()

    def write(self, data: bytes) -> int:
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        raise OSError(5, "Input/output error (power lost mid-write)")


def test_a_write_torn_halfway_never_replaces_the_record_of_the_last_good_model(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _installed(tmp_path, seed=1)
    real_open = open

    def torn_open(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = real_open(path, mode, *args, **kwargs)
        return _TornFile(f) if "w" in mode and Path(path).name.startswith("current.json") else f

    monkeypatch.setattr(files, "open", torn_open, raising=False)  # where the store's atomic writes open files
    with pytest.raises(ModelStorageError):
        model.install(update(build(INPUTS, 4, seed=2, masks=True), INPUTS, 4, 2))
    monkeypatch.undo()
    assert model.version == 1
    again = LocalModel(tmp_path / "m", PROFILE)  # the torn temporary file is removed, the record is intact
    assert again.version == 1 and again.counters["model_disk.bad_meta"] == 0
    assert np.allclose(again.predict(SAMPLES[0])[1], reference(SAMPLES[0], INPUTS, 4, seed=1, masks=True), atol=1e-5)
