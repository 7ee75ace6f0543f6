"""Aggregation cost per strategy: time, peak memory and bytes sent down, for 10/100/1,000 edges.

Adapters are MiniLM-sized (6 layers x query,value; hidden 384; LoRA rank 8: A (8, 384),
B (384, 8), float32, about 295 KB each), random.  Peak memory is the growth of the process's
resident high-water mark (VmHWM, reset through /proc/self/clear_refs before each run, so the
inputs, built beforehand, are not counted; glibc's mmap threshold is pinned at 1 MiB so heap
fragmentation is not counted either); where the reset is unavailable it falls back to the RSS
delta sampled after the run.  Timings use 1 BLAS thread by default (see --threads); the cloud's maths is
numpy (it never imports torch), so ``--threads`` caps numpy's BLAS/LAPACK through threadpoolctl.

The goal asks for cost growing linearly with the number of edges: ``growth_1000_over_100`` is
time(1,000) / time(100) per strategy (10x the edges), from the fastest of the repeats of each size
(the least disturbed by other work on a shared machine); ``linear`` marks a strategy whose growth is
at most 10x (up to 11x allowed for noise), ``superlinear`` one that grows faster. No socket is involved.

    python bench/bench_aggregation.py [--sizes 10 100 1000] [--repeats 3] [--out bench/results/aggregation.json]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import contextlib

from cloud_aggregator.contribution import Contribution
from cloud_aggregator.strategies import STRATEGIES, get_strategy

HIDDEN, LAYERS, RANK, ALPHA = 384, 6, 8, 16.0
LINEAR_MAX = 11.0  # 10x the edges: growth up to 10x is linear (or better); 10% allowed for noise
PREFIX = "base_model.model.encoder.layer.{i}.attention.self.{p}"


def make_contributions(n: int, seed: int = 0) -> list[Contribution]:
    g = np.random.default_rng(seed)
    out = []
    for k in range(n):
        t: dict[str, np.ndarray] = {}
        for i in range(LAYERS):
            for p in ("query", "value"):
                m = PREFIX.format(i=i, p=p)
                t[f"{m}.lora_A.weight"] = g.standard_normal((RANK, HIDDEN), dtype=np.float32) * 0.02
                t[f"{m}.lora_B.weight"] = g.standard_normal((HIDDEN, RANK), dtype=np.float32) * 0.02
        out.append(Contribution(f"edge-{k}", 1, 0, RANK, ALPHA, 10 + k % 50, t))
    return out


def _kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


M_MMAP_THRESHOLD = -3


def _fix_mmap_threshold(nbytes: int = 1 << 20) -> bool:
    """Serve every allocation over 1 MiB by mmap, so freed stacks go back to the OS at once.

    With glibc's default dynamic threshold, freed 12 MB stacks stay in the heap as fragments:
    fedavg over 1,000 edges then peaks near 130-200 MB instead of its ~48 MB working set.
    The service can do the same (``MALLOC_MMAP_THRESHOLD_=1048576``).
    """
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, nbytes))
    except (OSError, AttributeError):
        return False


def _reset_peak() -> bool:
    """Return freed heap to the OS, then reset VmHWM, so the next peak counts only new memory."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def nbytes(tensors: dict[str, np.ndarray]) -> int:
    return sum(t.nbytes for t in tensors.values())


def run_one(name: str, cs: list[Contribution], repeats: int) -> dict[str, float | int]:
    strat = get_strategy(name)
    times = []
    peak_kb = 0
    g = None
    for _ in range(repeats):
        g = None
        gc.collect()
        reset = _reset_peak()
        base = _kb("VmRSS")
        t0 = time.perf_counter()
        g = strat.aggregate(None, cs)
        times.append(time.perf_counter() - t0)
        peak_kb = max(peak_kb, (_kb("VmHWM") if reset else _kb("VmRSS")) - base)
    assert g is not None
    t0 = time.perf_counter()
    view = strat.view_for(g, RANK, alpha=ALPHA)
    first_view = time.perf_counter() - t0
    t0 = time.perf_counter()
    strat.view_for(g, RANK, alpha=ALPHA)
    next_view = time.perf_counter() - t0
    return {
        "aggregate_s": statistics.median(times),
        "aggregate_s_min": min(times),
        "peak_mem_mb": round(peak_kb / 1024, 1),
        "global_bytes": nbytes(g.tensors),
        "global_rank": g.rank_of(g.modules()[0]),
        "view_first_s": first_view,
        "view_next_s": next_view,
        "view_bytes_per_edge": nbytes(view),
        "down_bytes_total": nbytes(view) * len(cs),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--strategies", nargs="+", default=sorted(STRATEGIES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="BLAS threads; 1 by default because on a shared 2-core box thread spin-waiting made a 384x384 SVD"
        " 20x slower with 2 threads (measured with torch's OpenMP)",
    )
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "aggregation.json")
    args = ap.parse_args()

    load0 = [round(x, 2) for x in os.getloadavg()]
    threadpool_limits(args.threads)
    mmap_fixed = _fix_mmap_threshold()
    sets = {n: make_contributions(n) for n in args.sizes}
    for name in args.strategies:  # warm up kernels (the first LAPACK SVD call costs ~1 s)
        get_strategy(name).aggregate(None, sets[args.sizes[0]][:2])
    runs: dict[tuple[str, int], list[dict[str, float | int]]] = {}
    loads: list[float] = []
    for _ in range(args.repeats):  # interleaved: every repeat visits every size and strategy once
        loads.append(round(os.getloadavg()[0], 2))
        for n in args.sizes:
            for name in args.strategies:
                runs.setdefault((name, n), []).append(run_one(name, sets[n], repeats=1))
    del sets
    gc.collect()
    results: list[dict[str, object]] = []
    for n in args.sizes:
        for name in args.strategies:
            rs = runs[(name, n)]
            times = [float(x["aggregate_s"]) for x in rs]
            r = {**rs[-1], "aggregate_s": statistics.median(times), "aggregate_s_min": min(times),
                 "aggregate_s_runs": times, "peak_mem_mb": max(float(x["peak_mem_mb"]) for x in rs)}
            results.append({"strategy": name, "edges": n, **r})
            print(
                f"{name:15s} {n:5d} edges  agg {r['aggregate_s'] * 1e3:8.1f} ms  peak {r['peak_mem_mb']:7.1f} MB"
                f"  global {r['global_bytes'] / 1e6:7.2f} MB (rank {r['global_rank']})"
                f"  view {r['view_bytes_per_edge'] / 1e3:6.1f} KB/edge, first {r['view_first_s'] * 1e3:6.1f} ms",
                flush=True,
            )

    growth = {}
    for name in args.strategies:
        t = {r["edges"]: r["aggregate_s_min"] for r in results if r["strategy"] == name}
        if 100 in t and 1000 in t:
            growth[name] = round(float(t[1000]) / float(t[100]), 2)  # type: ignore[arg-type]
    print("time(1000)/time(100):", growth)
    fedavg_1000 = next((r["aggregate_s"] for r in results if r["strategy"] == "fedavg" and r["edges"] == 1000), None)
    linear = sorted(k for k, g in growth.items() if g <= LINEAR_MAX)
    superlinear = sorted(k for k, g in growth.items() if g > LINEAR_MAX)

    adapter_bytes = nbytes(make_contributions(1)[0].tensors)
    out = {
        "bench": "aggregation",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "adapter": {
            "layers": LAYERS,
            "modules": ["query", "value"],
            "hidden": HIDDEN,
            "rank": RANK,
            "dtype": "float32",
            "bytes": adapter_bytes,
        },
        "machine": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "blas": sorted({f"{p['internal_api']} {p.get('version')}" for p in threadpool_info()
                            if p["user_api"] == "blas"}),
            "blas_threads": min((p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"), default=0),
            "glibc_mmap_threshold_1MiB": mmap_fixed,
            "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "loadavg_at_start": load0,
            "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
            "loadavg_1min_per_repeat": loads,
        },
        "goal": "fedavg aggregates 1,000 edges in < 1 s; time grows linearly",
        "fedavg_1000_s": fedavg_1000,
        "met_fedavg_under_1s": fedavg_1000 is not None and fedavg_1000 < 1.0,
        "growth_1000_over_100": growth,
        "growth_from": "aggregate_s_min (fastest repeat) of each size",
        "linear_max_growth": LINEAR_MAX,
        "linear": linear,
        "superlinear": superlinear,
        "met_linear": not superlinear,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
