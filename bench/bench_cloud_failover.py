"""Cloud failover figures: three replicas on one PostgreSQL ledger, the leader SIGKILLed mid-stream.

Runs ``tests.support.cloud_ha.run_failover`` (real processes, a private Mosquitto and a private PostgreSQL
cluster on free loopback ports) ``--runs`` times and records, per run: time to recover (SIGKILL to the lease
taken, and to the first global published by the new leader), uploads lost (acknowledged but never applied, and
never applied at all), updates applied twice, versions published with two contents (forks), and the resends the
edges needed.  Writes ``bench/results/cloud_failover.json``.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_cloud_failover.py --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from broker.address import BrokerAddress  # noqa: E402
from broker.runners import MosquittoBroker  # noqa: E402
from cloud_aggregator.ledger_pg import PgLedger  # noqa: E402
from megace_common.postgres import PostgresServer  # noqa: E402
from tests.support.cloud_ha import run_failover  # noqa: E402


def one(pg: PostgresServer, replicas: int, sites: int, rounds: int) -> dict[str, object]:
    url = pg.create_database()
    with tempfile.TemporaryDirectory(prefix="megace-failover-") as tmp, MosquittoBroker() as broker:
        run = asyncio.run(run_failover(Path(tmp), BrokerAddress(broker.host, broker.port), url,
                                       replicas=replicas, sites=sites, rounds=rounds))
    with PgLedger(url) as led:
        final = led.latest_version() or 0
        applied = Counter(u for v in range(1, final + 1) for u in led.applied_in(v))
    expected = {(f"edge-{s}", q) for s in run.sites for q in range(1, rounds + 1)}
    return {
        "takeover_s": round(run.takeover_s, 3),
        "recover_s": round(run.recover_s, 3),
        "killed_at_version": run.killed_at_version,
        "final_version": final,
        "retained_version": run.retained_version,
        "uploads": len(expected),
        "acknowledged": len(run.acked),
        "acknowledged_not_applied": len(run.acked - set(applied)),
        "never_applied": len(expected - set(applied)),
        "updates_applied_twice": sum(1 for n in applied.values() if n > 1),
        "versions_forked": sum(1 for d in run.published.values() if len(d) > 1),
        "edge_resends": run.resends,
        "standby_sessions": sum(n for pid, n in run.sessions.items()
                                if pid not in (run.killed_pid, run.new_leader_pid)),
        "exit_codes": sorted(run.exit_codes),
    }


def accept_ms(url: str, state_dir: Path, n: int = 60, kib: int = 300) -> dict[str, float]:
    """Median milliseconds per durable ``accept`` of a ``kib`` KiB adapter (MiniLM r=8 is about 300 KB) and per
    ``commit_global`` of one: what each backend adds to an upload's acknowledgement and to a version."""
    import numpy as np

    from cloud_aggregator.contribution import Contribution, GlobalState
    from cloud_aggregator.ledger import open_ledger

    rng = np.random.default_rng(0)
    tensors = {"m.lora_A.weight": rng.standard_normal((8, kib * 256 // 8)).astype(np.float32)}
    led = open_ledger(url, state_dir)
    acc, com = [], []
    try:
        led.commit_global(GlobalState(0, tensors, "fedavg"), [])
        for i in range(n):
            c = Contribution(edge_id="e", seq=i + 1, base_version=0, rank=8, alpha=16.0, samples=1, modalities={},
                             fingerprint="f", tensors=tensors)
            t0 = time.perf_counter()
            uid = led.accept(c, 0, 1.0)
            t1 = time.perf_counter()
            led.commit_global(GlobalState(i + 1, tensors, "fedavg"), [uid])
            acc.append((t1 - t0) * 1000)
            com.append((time.perf_counter() - t1) * 1000)
    finally:
        led.close()
    return {"accept_ms_median": round(statistics.median(acc), 2), "commit_ms_median": round(statistics.median(com), 2),
            "adapter_kib": kib, "n": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--sites", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cloud_failover.json"))
    args = ap.parse_args()
    runs = []
    with PostgresServer() as pg:
        for i in range(args.runs):
            r = one(pg, args.replicas, args.sites, args.rounds)
            print(f"run {i + 1}: {r}", flush=True)
            runs.append(r)
        with tempfile.TemporaryDirectory(prefix="megace-ledger-") as tmp:
            ledger_cost = {"sqlite": accept_ms("", Path(tmp) / "sqlite"),
                           "postgresql": accept_ms(pg.create_database(), Path(tmp) / "pg")}
        print(f"ledger cost: {ledger_cost}", flush=True)
    rec = [float(r["recover_s"]) for r in runs]  # type: ignore[arg-type]
    doc = {
        "what": "SIGKILL of the active cloud replica mid-stream; a standby takes the PostgreSQL lease",
        "setup": {"replicas": args.replicas, "sites": args.sites, "rounds_per_site": args.rounds,
                  "buffer_k": 3, "lease_poll_s": 0.2, "heartbeat_s": 0.5, "broker": "mosquitto (private)",
                  "ledger": "postgresql 15 (private cluster, fsync on)"},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load": os.getloadavg()},
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "summary": {
            "recover_s_median": statistics.median(rec), "recover_s_max": max(rec),
            "takeover_s_median": statistics.median(float(r["takeover_s"]) for r in runs),  # type: ignore[arg-type]
            "uploads_lost": sum(int(r["acknowledged_not_applied"]) + int(r["never_applied"])  # type: ignore[call-overload]
                                for r in runs),
            "updates_applied_twice": sum(int(r["updates_applied_twice"]) for r in runs),  # type: ignore[call-overload]
            "versions_forked": sum(int(r["versions_forked"]) for r in runs),  # type: ignore[call-overload]
        },
        "runs": runs,
        "ledger_cost": ledger_cost,
        "command": "OMP_NUM_THREADS=1 .venv/bin/python bench/bench_cloud_failover.py --runs " + str(args.runs),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc["summary"], indent=2))


if __name__ == "__main__":
    main()
