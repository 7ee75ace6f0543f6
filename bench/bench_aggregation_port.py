"""Aggregation time of the numpy cloud against the torch cloud it replaced, side by side in one run.

The torch implementation is a checkout of the tree from before the port (``--torch-root``, e.g.
``git archive <commit> | tar -x -C /tmp/torch-cloud``); this tree is the numpy one. Each implementation
runs in a worker process of its own (both packages are named ``cloud_aggregator``), on the same inputs
(the MiniLM-sized adapters of ``bench_aggregation.py``, float32, drawn from one numpy seed), with one
BLAS/OpenMP thread, and the workers alternate ``--rounds`` times so that load on a shared machine falls
on both alike. Per strategy and size the fastest time of all rounds counts; ``ratio`` is numpy / torch
(below 1: the numpy cloud is faster).

    python bench/bench_aggregation_port.py --torch-root /tmp/torch-cloud [--sizes 10 100 1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
HIDDEN, LAYERS, RANK, ALPHA = 384, 6, 8, 16.0
PREFIX = "base_model.model.encoder.layer.{i}.attention.self.{p}"
STRATEGIES = ["fedavg", "fedsa", "flexlora", "flora", "hetlora", "median", "modality-aware", "norm-clip",
              "trimmed-mean"]
#: the coordinate-wise rules sort K dense ΔW per module: about a minute per call at 1,000 edges
ROBUST = {"median", "trimmed-mean"}


def worker(impl: str, root: str, sizes: list[int], strategies: list[str], repeats: int,
           robust_max: int) -> dict[str, float]:
    """Fastest ``aggregate`` time per ``strategy/size`` for one implementation (run in its own process)."""
    sys.path.insert(0, root)
    import numpy as np

    if impl == "torch":
        import torch

        torch.set_num_threads(1)
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    import cloud_aggregator
    from cloud_aggregator.contribution import Contribution
    from cloud_aggregator.strategies import get_strategy

    assert Path(cloud_aggregator.__file__).resolve().is_relative_to(Path(root).resolve()), cloud_aggregator.__file__

    def make(n: int) -> list[Any]:
        g = np.random.default_rng(0)
        out = []
        for k in range(n):
            t = {}
            for i in range(LAYERS):
                for p in ("query", "value"):
                    m = PREFIX.format(i=i, p=p)
                    t[f"{m}.lora_A.weight"] = g.standard_normal((RANK, HIDDEN), dtype=np.float32) * 0.02
                    t[f"{m}.lora_B.weight"] = g.standard_normal((HIDDEN, RANK), dtype=np.float32) * 0.02
            if impl == "torch":
                t = {n_: torch.from_numpy(a) for n_, a in t.items()}
            out.append(Contribution(f"edge-{k}", 1, 0, RANK, ALPHA, 10 + k % 50, t))
        return out

    times: dict[str, float] = {}
    for n in sizes:
        cs = make(n)
        for name in strategies:
            if name in ROBUST and n > robust_max:
                continue
            strat = get_strategy(name)
            strat.aggregate(None, cs[:2])  # warm-up (LAPACK's first SVD)
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                strat.aggregate(None, cs)
                best = min(best, time.perf_counter() - t0)
            times[f"{name}/{n}"] = best
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--torch-root", required=True, help="a tree of the torch cloud (before the numpy port)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--strategies", nargs="+", default=STRATEGIES)
    ap.add_argument("--rounds", type=int, default=3, help="alternations of the two workers")
    ap.add_argument("--repeats", type=int, default=1, help="timed aggregations per worker, strategy and size")
    ap.add_argument("--robust-max-edges", type=int, default=100, help="largest size median/trimmed-mean run at")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "aggregation_port.json")
    ap.add_argument("--worker", choices=["torch", "numpy"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        root = args.torch_root if args.worker == "torch" else str(HERE.parent)
        print(json.dumps(worker(args.worker, root, args.sizes, args.strategies, args.repeats, args.robust_max_edges)))
        return

    load0 = [round(x, 2) for x in os.getloadavg()]
    best: dict[str, dict[str, float]] = {"torch": {}, "numpy": {}}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    for r in range(args.rounds):
        for impl in ("torch", "numpy"):
            cmd = [sys.executable, __file__, "--worker", impl, "--torch-root", args.torch_root,
                   "--repeats", str(args.repeats), "--robust-max-edges", str(args.robust_max_edges),
                   "--sizes", *map(str, args.sizes), "--strategies", *args.strategies]
            got = json.loads(subprocess.check_output(cmd, env=env, cwd=HERE.parent).decode().splitlines()[-1])
            for k, v in got.items():
                best[impl][k] = min(best[impl].get(k, float("inf")), v)
            print(f"round {r + 1} {impl} done", flush=True)
    rows = []
    for key in best["numpy"]:
        name, n = key.rsplit("/", 1)
        t, p = best["torch"][key], best["numpy"][key]
        rows.append({"strategy": name, "edges": int(n), "torch_s": t, "numpy_s": p, "ratio": round(p / t, 3)})
        print(f"{name:15s} {n:>5s} edges  torch {t * 1e3:9.2f} ms  numpy {p * 1e3:9.2f} ms  numpy/torch {p / t:6.2f}")
    out = {
        "bench": "aggregation_port",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "what": "Strategy.aggregate time, numpy cloud vs the torch cloud before the port; fastest of all rounds",
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "threads": 1,
                    "loadavg_at_start": load0, "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]},
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
