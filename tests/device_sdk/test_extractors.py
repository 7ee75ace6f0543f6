"""Device feature extractors (issue 13, item 4): built by the real CLI, checked against torch, numpy and the edge.

One bundle is built per module with ``megace extractors build`` (MiniLM exported to ONNX, its tokenizer,
the IMU front ends). The ONNX text encoder is compared with MiniLM run by transformers, its ``tokenizers``
tokenization with ``AutoTokenizer``, the IMU front end with the basicmotions features the closed loop's
devices publish and with an independent numpy computation; what comes out goes over the wire codec into
a real edge registry and the model's sample validation. A subprocess that cannot import torch runs them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from broker.wire import CapabilityProfile, FeatureRecord, Kind, decode_envelope, encode_envelope
from device_sdk.extractors import (
    ExtractorError,
    ExtractorFileError,
    ExtractorInputError,
    ImuFrontEnd,
    TextEncoder,
    read_manifest,
)
from megace.cli import app
from megace_model.weights import minilm_path
from sdk.modules import ROOT

TEXTS = [
    "The front door was left open.",
    "Café naïve coöperation — déjà vu! 42 * 3 = 126 \u00d7",
    "hello",
    " ".join(["a long report of the machine room temperature rising slowly"] * 12),
]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The bundle, built once through the CLI, and what the command printed."""
    out = tmp_path_factory.mktemp("extractors") / "bundle"
    result = CliRunner().invoke(app, ["extractors", "build", "--out", str(out)])
    assert result.exit_code == 0, (result.output, result.exception)
    return out, result.output


@pytest.fixture(scope="module")
def bundle(built: tuple[Path, str]) -> Path:
    return built[0]


@pytest.fixture(scope="module")
def minilm() -> tuple[object, object]:
    """MiniLM and its tokenizer through transformers, loaded independently of megace's exporter."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    path = str(minilm_path())
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def test_cli_builds_a_bundle_whose_manifest_matches_its_files(built: tuple[Path, str]) -> None:
    bundle, printed = built
    manifest = read_manifest(bundle)
    on_disk = sorted(p.name for p in bundle.iterdir() if p.name != "manifest.json")
    assert sorted(manifest["files"]) == on_disk == ["imu.onnx", "imu_stats.onnx", "text_encoder.onnx",
                                                    "tokenizer.json"]
    for name, meta in manifest["files"].items():
        data = (bundle / name).read_bytes()
        assert (hashlib.sha256(data).hexdigest(), len(data)) == (meta["sha256"], meta["bytes"]), name
    text = manifest["extractors"]["text"]
    assert (text["token_dim"], text["max_tokens"], text["pooling"]) == (384, 16, "tokens")
    assert "all-MiniLM-L6-v2" in text["source"]["model"]
    assert manifest["extractors"]["imu"]["modalities"]["accel"]["token_dim"] == 30
    assert (bundle / "tokenizer.json").read_bytes() == (minilm_path() / "tokenizer.json").read_bytes()
    assert "text: text [16, 384]" in printed and "imu: accel [10, 30], gyro [10, 30]" in printed
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_cli_builds_what_it_is_asked_and_refuses_bad_options(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["extractors", "build", "--out", str(tmp_path / "imu"), "--no-text"])
    assert result.exit_code == 0, result.output
    assert sorted(read_manifest(tmp_path / "imu")["extractors"]) == ["imu", "imu-stats"]
    with pytest.raises(ExtractorFileError, match="no extractor 'text'"):
        TextEncoder.open(tmp_path / "imu")
    for args, message in ((["--text-pooling", "max"], "pooling"), (["--no-text", "--no-imu"], "nothing to build"),
                          (["--text-max-tokens", "0"], "max-tokens")):
        result = runner.invoke(app, ["extractors", "build", "--out", str(tmp_path / "bad"), *args],
                               terminal_width=200)
        assert result.exit_code != 0 and message in result.output, (args, result.output)
    assert not (tmp_path / "bad").exists()
    help_text = runner.invoke(app, ["extractors", "build", "--help"], terminal_width=200).output
    assert all(o in help_text for o in ("--out", "--text-pooling", "--no-text", "--no-imu"))


def test_tokenizers_gives_the_ids_of_transformers_autotokenizer(bundle: Path, minilm: tuple) -> None:
    tokenizer, _ = minilm
    for pooling, max_length in (("chunks", 256), ("tokens", 16 + 2)):
        ours = TextEncoder.open(bundle, pooling=pooling).tokenize(TEXTS)
        theirs = tokenizer(TEXTS, truncation=True, max_length=max_length)["input_ids"]
        assert ours == theirs, pooling
    assert len(ours[-1]) == 18 and ours[0][0] == 101 and ours[0][-1] == 102  # [CLS] ... [SEP]


def test_onnx_text_encoder_matches_minilm_in_torch(bundle: Path, minilm: tuple) -> None:
    import torch

    tokenizer, model = minilm
    batch = tokenizer(TEXTS, truncation=True, max_length=256, padding=True, return_tensors="pt")
    with torch.no_grad():
        reference = model(**batch).last_hidden_state.numpy()
    mask = batch["attention_mask"].numpy().astype(bool)
    chunks = TextEncoder.open(bundle, pooling="chunks")
    states, our_mask = chunks.hidden_states(TEXTS)
    assert states.dtype == np.float32 and np.array_equal(our_mask, mask)
    assert float(np.abs(states[mask] - reference[mask]).max()) < 1e-4

    tokens = TextEncoder.open(bundle)  # default: the first 16 word pieces' states, in their own context
    short = tokenizer(TEXTS[0], return_tensors="pt")
    with torch.no_grad():
        expected = model(**short).last_hidden_state[0, 1:-1].numpy()
    assert float(np.abs(tokens.encode(TEXTS[0]) - expected).max()) < 1e-4

    sentence = tokens.with_pooling("mean")  # the same onnxruntime session, pooled into the sentence embedding
    assert sentence._session is tokens._session and (sentence.shape, tokens.shape) == ((1, 384), (16, 384))
    mean = sentence.encode_batch(TEXTS)
    pooled = (reference * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
    assert float(np.abs(np.concatenate(mean) - pooled).max()) < 1e-4
    long_chunks = chunks.encode(TEXTS[-1])
    pieces = reference[-1][mask[-1]][1:-1]
    assert long_chunks.shape == (16, 384)
    assert float(np.abs(long_chunks[0] - pieces[: len(pieces) // 16 + 1].mean(0)).max()) < 1e-4


def test_features_fit_the_edge_registration_and_the_model(bundle: Path) -> None:
    from edge_agent.registry import DeviceRegistry
    from megace_model.batch import collate, validate_sample
    from megace_model.config import EdgeModelConfig, ModalitySpec

    text, imu = TextEncoder.open(bundle), ImuFrontEnd.open(bundle)
    config = EdgeModelConfig(modalities={"text": ModalitySpec(384, 16), "accel": ModalitySpec(30, 10),
                                         "gyro": ModalitySpec(30, 10)}, num_classes=4)
    registry = DeviceRegistry(config)
    profile = CapabilityProfile("gw-1", {"text": text.profile(), **imu.profiles(rate_hz=0.1)})
    entry = registry.register("gw-1", CapabilityProfile.from_body(profile.to_body()))
    assert entry.config(1).shapes == {"text": (16, 384), "accel": (10, 30), "gyro": (10, 30)}
    raw = np.random.default_rng(0).normal(size=(100, 6)) * 3
    samples = []
    for n, words in enumerate(TEXTS):
        features = {"text": text.encode(words), **imu(raw[: 10 * (n + 1)])}
        assert all(a.dtype == np.float32 and a.ndim == 2 and a.flags.c_contiguous for a in features.values())
        payload = encode_envelope(Kind.FEATURES, "gw-1", n, FeatureRecord("gw-1", n, features, label=n).to_body())
        record = FeatureRecord.from_body(decode_envelope(payload).body)
        sample = registry.check("gw-1", record, need_label=True)
        validate_sample(sample, config, need_label=True)
        samples.append(sample)
    batch = collate(samples, config)
    assert batch.token_mask["text"].sum(1).tolist() == [len(ids) - 2 for ids in text.tokenize(TEXTS)]
    assert batch.token_mask["accel"].sum(1).tolist() == [1, 2, 3, 4]


def test_imu_front_end_gives_the_basicmotions_features_the_loop_publishes(bundle: Path) -> None:
    from sktime.datasets import load_basic_motions

    from megace.datasets.basicmotions import load_basicmotions

    raw, _ = load_basic_motions(split="test", return_type="numpy3D")
    _, test = load_basicmotions(seed=0)
    imu = ImuFrontEnd.open(bundle)
    for i in range(0, len(test), 7):
        got = imu(np.asarray(raw[i]).T)  # a sensor buffer: [steps, channels]
        for m in ("accel", "gyro"):
            assert got[m].shape == (10, 30)
            assert float(np.abs(got[m] - test[i]["modalities"][m]).max()) < 2e-5, (i, m)


def test_imu_statistics_equal_an_independent_numpy_computation(bundle: Path) -> None:
    spec = read_manifest(bundle)["extractors"]["imu-stats"]
    mean, std = np.array(spec["norm_mean"]), np.array(spec["norm_std"])
    stats = ImuFrontEnd.open(bundle, "imu-stats")
    raw = np.random.default_rng(1).normal(size=(60, 6)) * 4 + 1
    got = stats(raw)
    z = (raw - mean) / std
    for m, chans in (("accel", [0, 1, 2]), ("gyro", [3, 4, 5])):
        w = z[:, chans].reshape(6, 10, 3)
        expected = np.concatenate([w.mean(1), w.std(1), np.abs(np.diff(w, axis=1)).mean(1)], axis=1)
        assert got[m].shape == (6, 9) and float(np.abs(got[m] - expected).max()) < 1e-5


NO_TORCH = r"""
import json, sys
for blocked in ("torch", "transformers", "megace", "megace_model", "sentence_transformers", "onnx"):
    sys.modules[blocked] = None  # importing any of them now raises ImportError
import numpy as np
import device_sdk
from device_sdk.extractors import ImuFrontEnd, TextEncoder
lazy = sorted(m for m in ("onnxruntime", "tokenizers") if m in sys.modules)
text, imu = TextEncoder.open(sys.argv[1]), ImuFrontEnd.open(sys.argv[1])
features = {"text": text.encode(sys.argv[2]), **imu(np.ones((100, 6)))}
loaded = sorted(n for n, m in sys.modules.items() if m is not None)  # the blocked ones stay None
print(json.dumps({"lazy": lazy, "loaded": loaded, "text": features["text"].tolist(),
                  "shapes": {k: list(v.shape) for k, v in features.items()}}))
"""


def test_extractors_run_where_torch_cannot_be_imported(bundle: Path) -> None:
    out = subprocess.run([sys.executable, "-c", NO_TORCH, str(bundle), TEXTS[0]], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout)
    assert got["lazy"] == []  # import device_sdk.extractors loads neither onnxruntime nor tokenizers
    assert {"onnxruntime", "tokenizers"} <= set(got["loaded"])
    assert not [m for m in got["loaded"] if m.split(".")[0] in ("torch", "transformers", "megace_model")]
    assert got["shapes"] == {"text": [7, 384], "accel": [10, 30], "gyro": [10, 30]}
    assert np.array_equal(np.array(got["text"], np.float32), TextEncoder.open(bundle).encode(TEXTS[0]))


def _clone(bundle: Path, into: Path) -> Path:
    """A copy of the bundle whose big files are symlinks (replace one to corrupt it, never the original)."""
    into.mkdir()
    for f in bundle.iterdir():
        if f.name == "manifest.json" or f.stat().st_size < 100_000:
            shutil.copyfile(f, into / f.name)
        else:
            (into / f.name).symlink_to(f)
    return into


def test_a_missing_or_corrupt_bundle_is_refused_with_a_typed_error(bundle: Path, tmp_path: Path) -> None:
    cases = {
        "no manifest": (lambda d: (d / "manifest.json").unlink(), "no manifest.json"),
        "bad manifest": (lambda d: (d / "manifest.json").write_text("{not json"), "unreadable manifest"),
        "missing model": (lambda d: (d / "imu.onnx").unlink(), "missing"),
        "truncated": (lambda d: (d / "imu.onnx").write_bytes((bundle / "imu.onnx").read_bytes()[:100]), "truncated"),
        "flipped byte": (lambda d: (d / "imu.onnx").write_bytes(bytes([255 - (bundle / "imu.onnx").read_bytes()[0]])
                                                               + (bundle / "imu.onnx").read_bytes()[1:]), "sha256"),
    }
    for i, (damage, message) in enumerate(cases.values()):
        d = _clone(bundle, tmp_path / f"b{i}")
        damage(d)
        with pytest.raises(ExtractorFileError, match=message):
            ImuFrontEnd.open(d)
    with pytest.raises(ExtractorFileError, match="missing"):  # the text encoder checks its tokenizer too
        d = _clone(bundle, tmp_path / "t")
        (d / "tokenizer.json").unlink()
        TextEncoder.open(d)
    with pytest.raises(ExtractorFileError, match="no extractor 'audio'"):
        ImuFrontEnd.open(bundle, "audio")
    with pytest.raises(ExtractorFileError, match="is a 'imu', not a 'text'"):
        TextEncoder.open(bundle, "imu")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07not a protobuf" * 50)
    with pytest.raises(ExtractorFileError, match="onnxruntime cannot load"):  # no manifest to catch it first
        ImuFrontEnd(garbage, channels=6, window=10, max_tokens=10, token_dims={"accel": 30})
    with pytest.raises(ExtractorFileError, match=r"not a tokenizers tokenizer\.json"):
        TextEncoder(bundle / "text_encoder.onnx", garbage, token_dim=384, max_tokens=4)
    with pytest.raises(ExtractorFileError, match="not a text encoder"):  # a valid ONNX file, the wrong model
        TextEncoder(bundle / "imu.onnx", bundle / "tokenizer.json", token_dim=384, max_tokens=4)
    with pytest.raises(ExtractorFileError, match="outputs"):
        ImuFrontEnd(bundle / "imu_stats.onnx", channels=6, window=10, max_tokens=10, token_dims={"accel": 30})
    assert issubclass(ExtractorFileError, ExtractorError)


def test_raw_input_that_cannot_fit_the_registration_is_refused(bundle: Path) -> None:
    imu, text = ImuFrontEnd.open(bundle), TextEncoder.open(bundle)
    bad = {"channels": np.zeros((100, 5)), "ragged": np.zeros((95, 6)), "too long": np.zeros((110, 6)),
           "empty": np.zeros((0, 6)), "strings": np.full((10, 6), "x"), "flat": np.zeros(60)}
    for name, x in bad.items():
        with pytest.raises(ExtractorInputError):
            imu(x)
        assert name
    nan = np.zeros((10, 6))
    nan[3, 2] = np.nan
    with pytest.raises(ExtractorInputError, match="NaN"):
        imu(nan)
    for texts in ([""], "not a list", [], [b"bytes"]):
        with pytest.raises(ExtractorInputError):
            text.encode_batch(texts)  # type: ignore[arg-type]
    assert isinstance(ExtractorInputError("x"), ValueError)
