"""ONNX vs torch inference at the edge: the tiny and the MiniLM model, batch 1 and 32, ratios side by side.

Both arms are the edge's own serving code on the same weights: torch is ``edge_agent.inference.Predictor``
(collate, forward of the unmerged peft model, softmax), ONNX is ``edge_agent.onnx_serving.OnnxPredictor`` on
the artifact ``megace_model.onnx.build_artifact`` makes (LoRA merged, personal head, softmax in the graph).
The models are moved off their initial state first (LoRA B and the head random), so the merge is not trivial.
Calls alternate torch, ONNX, torch, ... so a load change on the shared box hits both arms alike; each figure
is the median (and p90) of per-call wall times after warmup. ``ratio`` = torch / ONNX (> 1: ONNX faster).
``auto_serves`` is what ``training.onnx = "auto"`` would pick from these numbers (batch-1 latency).

Models: ``tiny`` is the toy config (env 1 token + imu 4 tokens: sequence 6 with the CLS token); ``minilm`` is
the bundled MiniLM with imu 32 tokens of 6 and audio 31 tokens of 64 (sequence 64, as in FIELD_NOTES).

    python bench/bench_onnx.py [--models tiny minilm] [--threads 1] [--reps-b1 200] [--reps-b32 20] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from edge_agent.inference import Predictor
from edge_agent.onnx_serving import OnnxPredictor
from edge_agent.training.toy_task import ToyTask, toy_config
from megace_model.adapters import build_edge_model
from megace_model.config import EdgeModelConfig, ModalitySpec
from megace_model.onnx import build_artifact


def model_config(name: str) -> EdgeModelConfig:
    if name == "tiny":
        return toy_config()
    specs = {"imu": ModalitySpec(token_dim=6, max_tokens=32), "audio": ModalitySpec(token_dim=64, max_tokens=31)}
    return toy_config(backbone="minilm", modalities=specs)


def moved_model(config: EdgeModelConfig) -> Any:
    model = build_edge_model(config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or ".head.1." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.05 if "lora_B" in name else 0.5))
    return model


def alternate(arms: dict[str, Callable[[], Any]], reps: int, warmup: int) -> dict[str, list[float]]:
    """Per-call milliseconds of each arm, calls interleaved."""
    times: dict[str, list[float]] = {k: [] for k in arms}
    for i in range(reps + warmup):
        for name, call in arms.items():
            start = time.perf_counter()
            call()
            if i >= warmup:
                times[name].append((time.perf_counter() - start) * 1000)
    return times


def summary(ms: list[float]) -> dict[str, float]:
    xs = sorted(ms)
    return {"p50_ms": round(statistics.median(xs), 4), "p90_ms": round(xs[int(0.9 * (len(xs) - 1))], 4)}


def bench_model(name: str, threads: int, reps_b1: int, reps_b32: int) -> dict[str, Any]:
    config = model_config(name)
    model = moved_model(config)
    task = ToyTask(config, seed=1)
    samples = [{"modalities": s["modalities"]} for s in task.samples(64)]
    started = time.perf_counter()
    artifact = build_artifact(model, config, samples[:32], version=1, threads=threads)
    export_s = time.perf_counter() - started
    torch_pred = Predictor(model, config, torch.device("cpu"))
    onnx_pred = OnnxPredictor(artifact, config, threads)
    check = np.abs(
        np.stack([p for _, p in torch_pred.predict(samples)]) - np.stack([p for _, p in onnx_pred.predict(samples)])
    ).max()
    rows = []
    for batch, reps in ((1, reps_b1), (32, reps_b32)):
        chunk = samples[:batch]
        times = alternate(
            {"torch": lambda c=chunk: torch_pred.predict(c), "onnx": lambda c=chunk: onnx_pred.predict(c)},
            reps,
            warmup=max(3, reps // 10),
        )
        t, o = summary(times["torch"]), summary(times["onnx"])
        row = {"batch": batch, "reps": reps, "torch": t, "onnx": o, "ratio": round(t["p50_ms"] / o["p50_ms"], 3)}
        rows.append(row)
        print(
            f"{name:>7} threads {threads} batch {batch:>2}: torch {t['p50_ms']:8.3f} ms  onnx {o['p50_ms']:8.3f} ms"
            f"  torch/onnx {row['ratio']:.2f}"
        )
    b1 = rows[0]
    return {
        "model": name,
        "sequence": config.sequence_length,
        "threads": threads,
        "onnx_bytes": len(artifact.data),
        "export_and_check_s": round(export_s, 3),
        "parity_max_abs": float(max(artifact.parity, check)),
        "results": rows,
        "auto_serves": "onnx" if b1["onnx"]["p50_ms"] < b1["torch"]["p50_ms"] else "torch",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "minilm"], choices=["tiny", "minilm"])
    ap.add_argument("--threads", type=int, nargs="+", default=[1], help="torch and onnxruntime threads (each run)")
    ap.add_argument("--reps-b1", type=int, default=200)
    ap.add_argument("--reps-b32", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "onnx.json")
    args = ap.parse_args()
    results = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name in args.models:
            reps_b1 = args.reps_b1 if name == "tiny" else max(10, args.reps_b1 // 4)
            reps_b32 = args.reps_b32 if name == "tiny" else max(5, args.reps_b32 // 2)
            results.append(bench_model(name, threads, reps_b1, reps_b32))
    doc = {
        "bench": "onnx",
        "command": " ".join(["python bench/bench_onnx.py", *sys.argv[1:]]),
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
        },
        "what": "edge inference per call (collate + forward + softmax): torch Predictor vs OnnxPredictor, same "
        "weights; ratio = torch p50 / onnx p50 (> 1: onnx faster); calls interleaved",
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
