"""One malicious edge among four, at the core level: how far each attack moves the global, per rule.

Drives the real ``AggregatorCore`` with real upload bytes (no broker): three honest edges and one
attacker upload for ``--rounds`` rounds (an aggregation after each), on the tiny test model the
cloud tests use (two modalities, LoRA rank 4 edges under a rank-8 cloud).  Honest updates are
what a local round does, roughly: the shared adapter plus a step common to all edges (the signal)
plus per-edge noise.  Attacks (``none`` = the attacker behaves honestly):

* ``first-1e4``: B x 10^4, from the very first upload on;
* ``norm-x15``: B x 15 (inside the old 20x band);
* ``samples-1e12``: an honest-looking update claiming 10^12 samples;
* ``factor-rescale``: A x 10^4, B x 10^-4 (ΔW unchanged);
* ``replay-fresh-seq``: the round-1 update re-sent every round with a new seq;
* ``flip-x3``: the current global as the attacker's rank loads it, B x -3 (an ordinary-sized adapter
  whose step points the global backwards; caught by step clipping, not by the norm guard).

For each rule (fedavg, hetlora, flexlora, norm-clip around fedavg, trimmed-mean, median) and each
attack it reports, after every round: ‖ΔW_global‖_F and the honest-only global's (same rule, same
settings, attacker absent), then the worst ratio of the two and the smallest cosine between the
dense ΔW's over the rounds, plus the refusals by reason; once with the defaults (``guards``) and
once with the settings before this change (``legacy``: 20x band armed after 5 uploads, no absolute
bound, no gauge fix, no sample clip, no share cap; content dedup and the no-trace refusals cannot
be switched off, so ``replay-fresh-seq`` is refused in both).  A stand-in for the closed loop's
accuracy claim that runs in about a minute.

    python bench/bench_poisoning.py [--rounds 3] [--out bench/results/poisoning.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker import topics
from broker.wire import AdapterUpdate, Kind, encode_envelope
from cloud_aggregator.config import load_cloud_config
from cloud_aggregator.core import AggregatorCore
from megace_model.adapters import build_edge_model, shared_state
from megace_model.config import EdgeModelConfig, ModalitySpec
from megace_model.fingerprint import base_fingerprint

MODALITIES = {"audio": {"token_dim": 12, "max_tokens": 2}, "image": {"token_dim": 20, "max_tokens": 1}}
CLOUD_RANK, EDGE_RANK, SAMPLES = 8, 4, 32
RULES = {
    "fedavg": ("fedavg", {}),
    "hetlora": ("hetlora", {}),
    "flexlora": ("flexlora", {}),
    "norm-clip(fedavg)": ("norm-clip", {"inner": "fedavg"}),
    "trimmed-mean": ("trimmed-mean", {}),
    "median": ("median", {}),
}
ATTACKS = ["none", "first-1e4", "norm-x15", "samples-1e12", "factor-rescale", "replay-fresh-seq", "flip-x3"]
LEGACY = {
    "validation": {"z_max": 6.0, "ratio_max": 100.0, "max_norm_ratio": 0.0, "factor_band": 0.0, "max_samples": 0,
                   "step_multiplier": 0.0},
    "aggregation": {"max_share": 1.0},
}


def model(rank: int) -> EdgeModelConfig:
    mods = {n: ModalitySpec(**s) for n, s in MODALITIES.items()}
    return EdgeModelConfig(modalities=mods, num_classes=3, lora_r=rank, lora_alpha=2 * rank)


BASE = {n: t.numpy().astype(np.float32) for n, t in shared_state(build_edge_model(model(EDGE_RANK))).items()}
FINGERPRINT = base_fingerprint(model(EDGE_RANK))


def honest(edge: int, rnd: int) -> dict[str, np.ndarray]:
    """Base + a step shared by every edge in this round (the signal) + per-edge noise."""
    common = np.random.default_rng(1000 + rnd)
    own = np.random.default_rng(10_000 * edge + rnd)
    return {n: (t + 0.05 * common.standard_normal(t.shape) + 0.02 * own.standard_normal(t.shape)).astype(np.float32)
            for n, t in BASE.items()}


def attacked(
    kind: str, rnd: int, first: dict[str, np.ndarray], core: AggregatorCore
) -> tuple[dict[str, np.ndarray], int]:
    t = honest(3, rnd)
    lora_b = {n: ".lora_B." in n for n in t}
    if kind == "first-1e4":
        return {n: v * 1e4 if lora_b[n] else v for n, v in t.items()}, SAMPLES
    if kind == "norm-x15":
        return {n: v * 15 if lora_b[n] else v for n, v in t.items()}, SAMPLES
    if kind == "samples-1e12":
        return t, 10**12
    if kind == "factor-rescale":
        return {n: (v * 1e-4 if lora_b[n] else v * 1e4).astype(np.float32) for n, v in t.items()}, SAMPLES
    if kind == "replay-fresh-seq":
        return first, SAMPLES
    if kind == "flip-x3":
        view = core.strategy.view_for(core.glob, rank=EDGE_RANK, modalities={"audio": SAMPLES, "image": SAMPLES},
                                      alpha=2.0 * EDGE_RANK)
        flipped = {n: (v * (-3.0 if ".lora_B." in n else 1.0)).astype(np.float32) for n, v in view.items()}
        return flipped, SAMPLES
    return t, SAMPLES


def upload(core: AggregatorCore, site: str, seq: int, tensors: dict[str, np.ndarray], samples: int) -> None:
    body = AdapterUpdate(edge=f"edge-{site}", site=site, seq=seq, base_version=core.version, base_model=FINGERPRINT,
                         rank=EDGE_RANK, alpha=2.0 * EDGE_RANK, samples=samples,
                         modalities={"audio": SAMPLES, "image": SAMPLES}, tensors=tensors).to_body()
    core.ingest(topics.adapter_up(site), encode_envelope(Kind.ADAPTER, f"edge-{site}", seq, body))


def dense(core: AggregatorCore) -> np.ndarray:
    g = {n: t.astype(np.float64) for n, t in core.glob.tensors.items()}  # the cloud holds numpy arrays
    parts = [g[n.replace(".lora_A.", ".lora_B.")] @ t for n, t in sorted(g.items()) if ".lora_A." in n]
    return np.concatenate([p.ravel() for p in parts])


def run(rule: str, attack: str | None, legacy: bool, rounds: int, root: Path) -> dict[str, object]:
    """``attack`` None: honest edges only."""
    strategy, options = RULES[rule]
    over: dict[str, dict[str, object]] = {"aggregation": {"strategy": strategy, "strategy_options": options,
                                                          "buffer_k": 100}}
    if legacy:
        over = {k: {**over.get(k, {}), **v} for k, v in LEGACY.items()} | {
            "aggregation": {**over["aggregation"], **LEGACY["aggregation"]}}
    state = Path(tempfile.mkdtemp(dir=root))
    cfg = load_cloud_config(None, {
        "cloud_id": "bench", "state_dir": str(state),
        "model": {"modalities": MODALITIES, "num_classes": 3, "lora_r": CLOUD_RANK, "lora_alpha": 2 * CLOUD_RANK},
        **over}, environ={})
    core = AggregatorCore(cfg)
    try:
        first = honest(3, 1)
        per_round: list[np.ndarray] = []
        for rnd in range(1, rounds + 1):
            if attack is not None:  # the attacker goes first: its first upload is the cloud's first
                tensors, samples = attacked(attack, rnd, first, core)
                upload(core, "evil", rnd, tensors, samples)
            for e in range(3):
                upload(core, f"h{e}", rnd, honest(e, rnd), SAMPLES)
            core.aggregate()
            per_round.append(dense(core))
        return {"dense": per_round, "rejected": dict(core.metrics()["rejected_reasons"]),
                "neutralised": {k: v for k, v in core.metrics()["neutralised"].items() if v}}
    finally:
        core.close()


def compare(got: np.ndarray, clean: np.ndarray) -> tuple[float, float, float]:
    """(‖got‖, ‖clean‖, cosine), rounded for the JSON."""
    gn, cn = float(np.linalg.norm(got)), float(np.linalg.norm(clean))
    cos = float(got @ clean / (gn * cn)) if gn > 0 and cn > 0 else float("nan")
    return round(gn, 4), round(cn, 4), round(cos, 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="bench/results/poisoning.json")
    args = ap.parse_args()
    logging.disable(logging.INFO)  # refusals log at INFO
    torch.set_num_threads(1)
    load0 = [round(x, 2) for x in os.getloadavg()]
    t0 = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for legacy in (False, True):
            for rule in RULES:
                clean = run(rule, None, legacy, args.rounds, Path(tmp))
                for attack in ATTACKS:
                    got = run(rule, attack, legacy, args.rounds, Path(tmp))
                    rows = [compare(g, c) for g, c in zip(got["dense"], clean["dense"], strict=True)]
                    results.append({
                        "settings": "legacy" if legacy else "guards", "rule": rule, "attack": attack,
                        "global_norm": [r[0] for r in rows], "honest_only_norm": [r[1] for r in rows],
                        "worst_norm_ratio": max(r[0] / r[1] for r in rows),
                        "min_cosine_to_honest_only": min(r[2] for r in rows),
                        "rejected": got["rejected"], "neutralised": got["neutralised"],
                    })
                    r = results[-1]
                    print(f"{r['settings']:6} {rule:18} {attack:17} worst norm x{r['worst_norm_ratio']:10.3g}"
                          f"  min cos {r['min_cosine_to_honest_only']:+.3f}  refused {r['rejected']}")
    out = {
        "bench": "poisoning",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "setup": {"edges": "3 honest + 1 attacker", "rounds": args.rounds, "edge_rank": EDGE_RANK,
                  "cloud_rank": CLOUD_RANK, "samples_per_edge": SAMPLES, "model": "tiny test model (cloud tests)"},
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                    "loadavg_at_start": load0, "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]},
        "seconds": round(time.perf_counter() - t0, 1),
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
