"""Resident memory of the real cloud service with the MiniLM configuration, fresh and restarted.

Starts ``python -m cloud_aggregator --config FILE`` (what systemd runs) against a private Mosquitto,
with a MiniLM model config (the bundled all-MiniLM-L6-v2, offline), and samples the service's RSS
with psutil every 20 ms from launch to stop. Two phases on one state directory:

* ``fresh``: an empty state dir, so the cloud builds version 0 (and ``reference.json``);
* ``restart``: the same state dir again (the ledger holds globals: no build).

In each phase, after the first global is on the bus, ``start_steady`` is the service's RSS once it
has idled for a few seconds; then ``--rounds`` aggregations are fed by real uploads (the global
as it stands, perturbed, encoded by ``tests/support/cloud_bus.update_payload``, one per site, buffer_k =
sites) and ``after_rounds_steady`` is taken the same way. ``peak`` is the highest sampled RSS of the
service process itself; ``peak_tree`` also adds any children it runs at the same time (the one-off
version-0 builder). ``torch_import`` is a bare ``python -c "import torch"`` for scale: the floor of
the service while it did its maths in torch (it is numpy now; only the builder child imports torch).
The result is stored under ``--label`` (e.g. ``before`` / ``after`` / ``numpy``) in the JSON file,
keeping the other labels already there.

    python bench/bench_cloud_rss.py --label after [--rounds 3] [--sites 3] [--out bench/results/cloud_rss.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import psutil
from safetensors.numpy import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker import topics
from broker.address import BrokerAddress
from broker.runners import MosquittoBroker
from broker.topics import Role
from broker.wire import GlobalAdapter, decode_metrics
from broker.wire.bodies import decode_body
from cloud_aggregator.config import load_cloud_config, write_cloud_config
from tests.support.cloud_bus import perturbed, update_payload
from tests.support.collector import Collector

MIB = 2**20
GOAL_MIB = 210
RANK = 8
MODALITIES = {"imu": {"token_dim": 6, "max_tokens": 16}, "audio": {"token_dim": 64, "max_tokens": 8}}


class Sampler(threading.Thread):
    """Samples one process's RSS (and its tree's) until stopped; keeps the peaks and the last value."""

    def __init__(self, pid: int, period: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.period = period
        self.peak = self.peak_tree = self.last = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                own = self.proc.memory_info().rss
                tree = own + sum(_rss(c) for c in self.proc.children(recursive=True))
            except psutil.Error:
                return
            self.last, self.peak, self.peak_tree = own, max(self.peak, own), max(self.peak_tree, tree)
            time.sleep(self.period)


def _rss(p: psutil.Process) -> int:
    try:
        return p.memory_info().rss
    except psutil.Error:
        return 0


def _wait(pred: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := pred()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return value


def _versions(col: Collector, start: int = 0) -> list[int]:
    return [b.version for _, e in col.envelopes[start:] if isinstance(b := decode_body(e), GlobalAdapter)]


def _metrics(col: Collector, cloud_id: str) -> dict[str, Any] | None:
    topic = topics.metrics(Role.CLOUD, cloud_id)
    docs = [decode_metrics(p)["metrics"] for t, p, _ in col.raw if t == topic]
    return docs[-1] if docs else None


def _steady(sampler: Sampler, settle: float) -> int:
    """RSS after idling ``settle`` seconds: the median of the last second's samples."""
    time.sleep(max(settle - 1.0, 0.0))
    values = []
    for _ in range(20):
        values.append(sampler.last)
        time.sleep(0.05)
    return int(np.median(values))


def phase(cfg_path: Path, state_dir: Path, addr: BrokerAddress, cloud_id: str, fingerprint: str,
          *, sites: int, rounds: int, settle: float, seq0: int) -> dict[str, Any]:
    """One service run: start, idle, feed ``rounds`` aggregations, idle, stop; RSS figures in MiB."""
    filters = [*topics.subscriptions(topics.global_down()), topics.metrics(Role.CLOUD, cloud_id)]
    with Collector(addr, *filters) as col, open(state_dir.parent / "cloud.log", "ab") as log:
        time.sleep(0.5)  # the retained global of an earlier run arrives first: count only what follows
        mark = len(col.envelopes)
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "cloud_aggregator", "--config", str(cfg_path)],
                                stderr=log)
        sampler = Sampler(proc.pid)
        sampler.start()
        try:
            _wait(lambda: _versions(col, mark), 300, "the first global")
            first_global_s = time.monotonic() - t0
            start_steady = _steady(sampler, settle)
            peak_start = sampler.peak
            pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-edges-{seq0}")
            pub.connect(addr.host, addr.port)
            pub.loop_start()
            try:
                for r in range(rounds):
                    version = max(_versions(col, mark))
                    glob = load_file(str(state_dir / "globals" / f"v{version:08d}.safetensors"))
                    for i in range(sites):
                        site, seq = f"s{i}", seq0 + r
                        update = perturbed(glob, seed=zlib.crc32(f"{site}/{seq}".encode()), scale=0.002)
                        # alpha = rank: scaling 1, the global's own (alpha/r is folded into its B)
                        payload = update_payload(update, site=site, seq=seq, base_version=version,
                                                 fingerprint=fingerprint, rank=RANK, alpha=RANK,
                                                 modalities={m: 32 for m in MODALITIES})
                        pub.publish(topics.adapter_up(site), payload, qos=1).wait_for_publish(10)
                    _wait(lambda v=version: max(_versions(col, mark)) > v, 120, f"aggregation {r + 1}")
            finally:
                pub.loop_stop()
                pub.disconnect()
            after_rounds = _steady(sampler, settle)
            metrics = _metrics(col, cloud_id) or {}
        finally:
            proc.terminate()
            code = proc.wait(60)
            sampler.halt.set()
            sampler.join()
    return {
        "first_global_s": round(first_global_s, 2),
        "peak_to_first_global_mib": round(peak_start / MIB, 1),
        "start_steady_mib": round(start_steady / MIB, 1),
        "after_rounds_steady_mib": round(after_rounds / MIB, 1),
        "peak_mib": round(sampler.peak / MIB, 1),
        "peak_tree_mib": round(sampler.peak_tree / MIB, 1),
        "final_version": max(_versions(col, mark)),
        "accepted": metrics.get("accepted"),
        "rejected": metrics.get("rejected"),
        "exit_code": code,
    }


def torch_import_mib() -> float:
    """RSS of a bare interpreter after ``import torch`` (the floor while the service used torch)."""
    code = "import torch, psutil; print(psutil.Process().memory_info().rss)"
    return round(int(subprocess.check_output([sys.executable, "-c", code])) / MIB, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="key the run is stored under, e.g. before / after")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--settle", type=float, default=4.0, help="seconds idled before a steady reading")
    parser.add_argument("--note", default="", help="what code the run measured (stored with it)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "cloud_rss.json"))
    args = parser.parse_args()

    from megace_model.config import EdgeModelConfig
    from megace_model.fingerprint import base_fingerprint

    model = {"backbone": "minilm", "modalities": MODALITIES, "num_classes": 4, "lora_r": RANK,
             "lora_alpha": 2 * RANK}
    fingerprint = base_fingerprint(EdgeModelConfig.from_dict(model))
    with MosquittoBroker() as broker, tempfile.TemporaryDirectory(prefix="megace-cloud-rss-") as tmp:
        addr = BrokerAddress(broker.host, broker.port)
        state_dir = Path(tmp) / "state"
        cfg = load_cloud_config(None, {
            "cloud_id": "cloud-rss", "broker": f"mqtt://{addr.host}:{addr.port}", "state_dir": str(state_dir),
            "model": model,
            "aggregation": {"strategy": "fedavg", "buffer_k": args.sites, "max_share": 1.0},
        }, environ={})
        cfg_path = write_cloud_config(cfg, Path(tmp) / "cloud.toml")
        run: dict[str, Any] = {"note": args.note, "sites": args.sites, "rounds": args.rounds, "settle_s": args.settle}
        kw = {"sites": args.sites, "rounds": args.rounds, "settle": args.settle}
        run["fresh"] = phase(cfg_path, state_dir, addr, cfg.cloud_id, fingerprint, seq0=1, **kw)
        print("fresh", run["fresh"], flush=True)
        run["restart"] = phase(cfg_path, state_dir, addr, cfg.cloud_id, fingerprint, seq0=1 + args.rounds, **kw)
        print("restart", run["restart"], flush=True)
    run["torch_import_mib"] = torch_import_mib()
    run["command"] = shlex.join(["python", "bench/bench_cloud_rss.py", *sys.argv[1:]])
    run["met"] = all(run[p]["peak_mib"] <= GOAL_MIB for p in ("fresh", "restart"))

    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.exists() else {}
    doc.update({
        "bench": "cloud_rss",
        "command": f"python bench/bench_cloud_rss.py --label {args.label} --rounds {args.rounds} --sites {args.sites}",
        "machine": f"{platform.machine()}, {psutil.cpu_count()} CPUs, Python {platform.python_version()}",
        "goal": f"cloud RSS <= {GOAL_MIB} MiB with the MiniLM configuration (peak of the service process)",
        "model": model,
    })
    doc.setdefault("runs", {})[args.label] = run
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(run, indent=1))


if __name__ == "__main__":
    main()
