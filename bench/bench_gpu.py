"""Edge training step and edge inference on an accelerator, side by side with the same machine's CPU.

Why: the edge agent's ``Trainer`` picks CUDA when it is present, but CI (and these 2-core machines) only
ever run the CPU path; this records what a GPU buys an edge, measured in one process against the same
machine's CPU as the baseline (issue 12, item 8).

(a) training step: the real edge ``Trainer.train_round`` (replay sampling, per-step collation on the CPU,
    host-to-device copy, forward, cross-entropy, backward, clip, AdamW), batch 32, on the toy task's
    samples; ``repeats`` rounds of ``steps`` steps after a warm-up round, ms per step of each round, median
    reported. Beside it, the same math on pre-collated batches already on the device (``model_only``), to
    show how much of the step is the edge's own per-step host work.
(b) inference: the agent's ``Predictor`` (collation, host-to-device copy, forward, softmax, copy back) on
    batch 1 and batch 32, p50 / p99 over ``requests`` calls after a warm-up.

Backbones: ``tiny`` (the CI one) and a MiniLM-shaped BERT (all-MiniLM-L6-v2's config: 6 layers, hidden 384,
12 heads, intermediate 1536, vocab 30522) with seeded *random* weights: the real weights (91 MB) cannot
travel to the GPU machine, and timing does not depend on the values. Every CUDA timing is bracketed by
``torch.cuda.synchronize()`` (the Trainer and the Predictor also synchronise each step by reading results
back). Figures from one run; the CPU side uses ``--cpu-threads`` torch threads.

    python bench/bench_gpu.py [--device auto|cpu|cuda] [--steps 20] [--out bench/results/gpu.json]

Imports only the trainer, the model and the predictor (no MQTT client), so it runs on a machine
that has torch, transformers and peft but no paho-mqtt or aiomqtt.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F
from transformers import BertConfig, BertModel

import edge_agent.training.trainer as trainer_module
import megace_model.classifier as classifier_module
from edge_agent.inference import Predictor
from edge_agent.training.toy_task import ToyTask, toy_config
from edge_agent.training.trainer import Trainer
from megace_model.batch import collate
from megace_model.config import EdgeModelConfig
from megace_model.seeding import seeded

BATCH = 32
#: all-MiniLM-L6-v2's config.json (sentence-transformers), the fields that set shapes and compute.
MINILM_SHAPE: dict[str, Any] = {
    "vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
    "intermediate_size": 1536, "max_position_embeddings": 512, "type_vocab_size": 2, "hidden_act": "gelu",
    "layer_norm_eps": 1e-12, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
}


def minilm_shaped_config() -> BertConfig:
    """A BertConfig with all-MiniLM-L6-v2's shape (what the real backbone's config.json says)."""
    return BertConfig(**MINILM_SHAPE)


@contextlib.contextmanager
def minilm_shaped_backbone() -> Iterator[None]:
    """While inside, ``backbone = "minilm"`` builds a MiniLM-shaped BERT with seeded random weights.

    Why: the Trainer builds its model through ``megace_model.classifier.build_backbone`` and fingerprints
    the weights file; neither the file nor its pip package exists on the GPU machine. Swapped back on exit.
    """
    real_build, real_fp = classifier_module.build_backbone, trainer_module.base_fingerprint

    def build(config: EdgeModelConfig) -> BertModel:
        if config.backbone != "minilm":
            return real_build(config)
        with seeded(config.seed, "backbone"):
            return BertModel(minilm_shaped_config(), add_pooling_layer=False)

    def fingerprint(config: EdgeModelConfig) -> str:
        return "minilm-shaped-random" if config.backbone == "minilm" else real_fp(config)

    classifier_module.build_backbone, trainer_module.base_fingerprint = build, fingerprint
    try:
        yield
    finally:
        classifier_module.build_backbone, trainer_module.base_fingerprint = real_build, real_fp


def sync(device: torch.device) -> None:
    """Wait for queued kernels, so a wall-clock reading covers the work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(device: torch.device, fn: Callable[[], Any]) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - t0) * 1000


def quantile(values: list[float], q: float) -> float:
    xs = sorted(values)
    return xs[round(q * (len(xs) - 1))]


def make_trainer(backbone: str, device: torch.device) -> tuple[Trainer, list[dict[str, Any]]]:
    """A Trainer on ``device`` with 8 batches of toy samples buffered; no held-out slice (trains on all)."""
    config = toy_config(backbone=backbone)
    samples = ToyTask(config, seed=13).samples(BATCH * 8)
    trainer = Trainer(config, device=device, holdout_every=10**9)
    for s in samples:
        trainer.add_sample(s)
    return trainer, samples


def bench_trainer(trainer: Trainer, device: torch.device, steps: int, warmup: int, repeats: int) -> dict[str, Any]:
    """ms per step of ``Trainer.train_round`` (median of ``repeats`` rounds after a warm-up round)."""
    trainer.train_round(steps=warmup, batch_size=BATCH)
    runs = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        metrics = trainer.train_round(steps=steps, batch_size=BATCH)
        sync(device)
        ms = (time.perf_counter() - t0) * 1000
        if metrics["steps"] != steps or metrics["skipped_steps"]:
            raise RuntimeError(f"round did {metrics['steps']} of {steps} steps ({metrics['skipped_steps']} skipped)")
        runs.append(ms / steps)
    med = statistics.median(runs)
    return {"ms_per_step": round(med, 3), "steps_per_s": round(1000 / med, 2),
            "runs_ms_per_step": [round(x, 3) for x in runs], "final_loss": round(float(metrics["loss"]), 4)}


def bench_model_only(trainer: Trainer, samples: list[dict[str, Any]], device: torch.device, steps: int,
                     warmup: int, repeats: int) -> dict[str, Any]:
    """The same math as a Trainer step on pre-collated batches already on the device (no host work)."""
    model, params, opt = trainer.model, trainer._params, trainer.optimizer
    batches = [collate(samples[i * BATCH:(i + 1) * BATCH], trainer.config).to(device)
               for i in range(len(samples) // BATCH)]
    model.train()

    def run(n: int) -> None:
        for i in range(n):
            b = batches[i % len(batches)]
            loss = F.cross_entropy(model(**b.model_inputs()).logits, b.labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, trainer.max_grad_norm)
            opt.step()

    timed_ms(device, lambda: run(warmup))
    runs = [timed_ms(device, lambda: run(steps)) / steps for _ in range(repeats)]
    med = statistics.median(runs)
    return {"ms_per_step": round(med, 3), "steps_per_s": round(1000 / med, 2),
            "runs_ms_per_step": [round(x, 3) for x in runs]}


def bench_predictor(trainer: Trainer, samples: list[dict[str, Any]], device: torch.device, requests: int,
                    warmup: int) -> dict[str, Any]:
    """p50 / p99 ms of ``Predictor.predict`` on batch 1 and batch 32 (the agent's inference worker call)."""
    predictor = Predictor(trainer.model, trainer.config, device)
    out: dict[str, Any] = {}
    for size in (1, BATCH):
        groups = [samples[(i * size) % len(samples):][:size] for i in range(len(samples) // size)]
        groups = [g for g in groups if len(g) == size]
        times = []
        for i in range(warmup + requests):
            ms = timed_ms(device, functools.partial(predictor.predict, groups[i % len(groups)]))
            if i >= warmup:
                times.append(ms)
        p50 = statistics.median(times)
        out[f"batch_{size}"] = {"p50_ms": round(p50, 3), "p99_ms": round(quantile(times, 0.99), 3),
                                "min_ms": round(min(times), 3), "samples_per_s_at_p50": round(size * 1000 / p50, 1),
                                "calls": requests}
    return out


def bench_device(device: torch.device, backbones: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """All figures for one device, each backbone built fresh (same seeds on every device)."""
    rows: dict[str, Any] = {}
    for backbone in backbones:
        started = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        trainer, samples = make_trainer(backbone, device)
        backbone_module = trainer.model.get_base_model().backbone
        row: dict[str, Any] = {
            "backbone_params": sum(p.numel() for n, p in backbone_module.named_parameters() if "lora_" not in n),
            "train_step": bench_trainer(trainer, device, args.steps, args.warmup, args.repeats),
            "model_only_step": bench_model_only(trainer, samples, device, args.steps, args.warmup, args.repeats),
            "inference": bench_predictor(trainer, samples, device, args.requests, args.warmup),
        }
        if device.type == "cuda":
            row["peak_gpu_memory_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        row["seconds"] = round(time.perf_counter() - started, 1)
        rows[backbone] = row
        t, i1, i32 = row["train_step"], row["inference"]["batch_1"], row["inference"]["batch_32"]
        print(f"  {device.type:<5}{backbone:<8}train {t['ms_per_step']:>9.2f} ms/step  "
              f"infer b1 p50/p99 {i1['p50_ms']:.2f}/{i1['p99_ms']:.2f} ms  "
              f"b32 p50/p99 {i32['p50_ms']:.2f}/{i32['p99_ms']:.2f} ms  ({row['seconds']} s)", flush=True)
        del trainer
    return rows


def machine(devices: list[torch.device]) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(), "torch_cpu_threads": torch.get_num_threads(), "cpu": platform.processor(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
    }
    with contextlib.suppress(OSError, StopIteration):
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    if shutil.which("nvidia-smi"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            info["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    with contextlib.suppress(ImportError):
        import transformers
        info["transformers"] = transformers.__version__
    if any(d.type == "cuda" for d in devices):
        props = torch.cuda.get_device_properties(0)
        info.update({"gpu": torch.cuda.get_device_name(0), "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                     "gpu_multiprocessors": props.multi_processor_count,
                     "gpu_capability": f"{props.major}.{props.minor}"})
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: the CPU plus CUDA when present; cpu: the CPU only; cuda: both, CUDA required")
    parser.add_argument("--backbones", default="tiny,minilm")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=5, help="warm-up steps / calls")
    parser.add_argument("--requests", type=int, default=300, help="timed predictor calls per batch size")
    parser.add_argument("--cpu-threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "gpu.json"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    torch.set_num_threads(args.cpu_threads or os.cpu_count() or 1)
    devices = [torch.device("cpu")]
    if args.device != "cpu" and torch.cuda.is_available():
        devices.append(torch.device("cuda:0"))
    backbones = [b for b in args.backbones.split(",") if b]
    result: dict[str, Any] = {
        "bench": "gpu",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(devices),
        "settings": {"batch": BATCH, "steps": args.steps, "repeats": args.repeats, "warmup": args.warmup,
                     "requests": args.requests, "dtype": "float32", "task": "toy task (imu 4x6 + env 1x8, 4 classes)",
                     "sequence_length": toy_config().sequence_length},
        "backbones": {"tiny": "tiny BERT (hidden 128, 2 layers), seeded random, as in CI",
                      "minilm": "MiniLM-shaped BERT (all-MiniLM-L6-v2 config: 6 layers, hidden 384, 12 heads, "
                                "intermediate 1536), seeded RANDOM weights, not the pretrained ones: timing only"},
        "note": "train_step = the edge Trainer.train_round per step (host collation and copy included); "
                "model_only_step = same math on batches already on the device; inference = Predictor.predict "
                "(collate, forward, softmax, copy back). Medians / quantiles of one run.",
        "devices": {},
    }
    with minilm_shaped_backbone():
        for device in devices:
            print(f"{device} ...", flush=True)
            result["devices"][device.type] = bench_device(device, backbones, args)
    if "cuda" in result["devices"]:
        cpu, gpu = result["devices"]["cpu"], result["devices"]["cuda"]
        result["speedup_gpu_over_cpu"] = {
            b: {"train_step": round(cpu[b]["train_step"]["ms_per_step"] / gpu[b]["train_step"]["ms_per_step"], 2),
                "inference_batch_1_p50": round(cpu[b]["inference"]["batch_1"]["p50_ms"]
                                               / gpu[b]["inference"]["batch_1"]["p50_ms"], 2),
                "inference_batch_32_p50": round(cpu[b]["inference"]["batch_32"]["p50_ms"]
                                                / gpu[b]["inference"]["batch_32"]["p50_ms"], 2)}
            for b in backbones}
    result["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
