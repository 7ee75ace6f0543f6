"""SIGKILL a real edge agent while a device streams at QoS 1, and count what it lost or took twice.

A device (the real :class:`DeviceClient`) publishes numbered, labelled records (the number rides in
the ``env`` modality's first element) to a private Mosquitto at a steady rate; the edge agent runs
as its own process (``python -m edge_agent``) with rounds every 40 samples, so kills land during
ingest, rounds and checkpoints alike. The agent is killed with SIGKILL at random moments and
restarted. At the end the device flushes (every record acknowledged by the broker), the agent is
stopped cleanly, and its committed checkpoint is read: every record must be in its replay buffer
exactly once.

    python -m tests.reliability.edge_kill --kills 10 [--records 3000] [--out bench/results/edge_kill.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from broker import topics
from broker.address import BrokerAddress
from broker.runners import MosquittoBroker
from device_sdk import DeviceClient
from edge_agent.state import StateStore
from edge_agent.training.toy_task import ToyTask
from tests.support.collector import Collector
from tests.support.edge_testkit import edge_config, record, toy_profile, uid

REPO = Path(__file__).resolve().parents[2]


@dataclass
class EdgeKillRun:
    kills: int
    records: int
    acked: int = 0
    in_checkpoint: int = 0
    lost: list[int] = field(default_factory=list)
    duplicated: list[int] = field(default_factory=list)
    replayed: int = 0
    restarts_s: list[float] = field(default_factory=list)
    seconds: float = 0.0


def numbered(task: ToyTask, i: int) -> dict[str, Any]:
    """A toy sample whose ``env`` modality carries ``i`` in its first element (exact in float32)."""
    sample = task.sample()
    env = np.array(sample["modalities"].get("env", np.zeros(8, np.float32)), dtype=np.float32)
    env[0] = float(i)
    sample["modalities"] = {**sample["modalities"], "env": env}
    return sample


def _start(config_path: Path, log_path: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "edge_agent", "--config", str(config_path)], cwd=REPO,
                                env=env, stdout=log, stderr=subprocess.STDOUT)


def _checkpointed_numbers(state: Path) -> list[int]:
    store = StateStore(state)
    gen = store.read(store.candidates()[0])
    return [int(np.asarray(s.modalities["env"]).ravel()[0]) for s in gen.samples]


def _replayed(metrics: Collector, edge_id: str, site: str) -> int:
    """The most any agent reported under ``ingest_replayed`` (messages re-ingested from its log at start)."""
    topic = topics.metrics(topics.Role.EDGE, edge_id, site)
    return max([int(json.loads(p)["metrics"].get("ingest_replayed", 0)) for t, p, _ in list(metrics.raw)
                if t == topic] or [0])


def _wait_for_samples(metrics: Collector, edge_id: str, site: str, n: int, timeout: float) -> None:
    """Until the agent's metrics report ``n`` samples taken (restored totals plus replay plus live)."""
    topic = topics.metrics(topics.Role.EDGE, edge_id, site)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        latest = [json.loads(p)["metrics"] for t, p, _ in list(metrics.raw) if t == topic]
        if latest and latest[-1].get("samples_total", 0) >= n:
            return
        time.sleep(0.5)
    raise AssertionError(f"the agent did not report {n} samples within {timeout} s")


def edge_kill_run(kills: int, records: int, *, workdir: Path, seed: int = 0, rate_hz: float = 200.0,
                  gap_s: tuple[float, float] = (1.0, 3.0), fsync: bool = True) -> EdgeKillRun:
    rng = random.Random(seed)
    run = EdgeKillRun(kills=kills, records=records)
    broker = MosquittoBroker(state_dir=workdir / "broker").start()
    addr = BrokerAddress(broker.host, broker.port)
    state = workdir / "state"
    config = edge_config(state, addr, {
        "edge_id": uid("kill"), "ingest_fsync": fsync, "metrics_interval_s": 1.0,
        "training": {"min_new_samples": 40, "interval_s": 3600.0, "steps": 4, "startup_grace_s": 0.3},
        "limits": {"replay_max_total": records + 100, "replay_max_per_device": 0},
    })
    config_path = config.write(workdir / "edge.toml")
    log_path = workdir / "agent.log"
    task = ToyTask(config.model, seed=seed)
    device = DeviceClient(config.site, uid("dev"), addr, store_path=workdir / "device.sqlite")
    metrics = Collector(addr, topics.metrics(topics.Role.EDGE, config.edge_id, config.site)).start()
    proc = _start(config_path, log_path)
    started = time.monotonic()
    try:
        device.connect(30)
        device.register(toy_profile(device.device))
        done = threading.Event()

        def stream() -> None:
            for i in range(records):
                device.publish(record(device.device, i, numbered(task, i)))
                time.sleep(1.0 / rate_hz)
            done.set()

        publisher = threading.Thread(target=stream, daemon=True)
        _wait_for_samples(metrics, config.edge_id, config.site, 0, timeout=120)  # the first agent is up and subscribed:
        # from here its persistent session queues what it cannot take while it is down
        publisher.start()
        for _ in range(kills):
            time.sleep(rng.uniform(*gap_s))
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            t0 = time.monotonic()
            proc = _start(config_path, log_path)
            run.restarts_s.append(time.monotonic() - t0)
        publisher.join()
        if not device.flush(120):
            raise AssertionError("the device could not get every record acknowledged")
        run.acked = records
        # the last agent takes what the broker still holds for its session, then stops cleanly
        _wait_for_samples(metrics, config.edge_id, config.site, records, timeout=180)
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
        numbers = _checkpointed_numbers(state)
        counts = Counter(numbers)
        run.in_checkpoint = len(numbers)
        run.lost = sorted(set(range(records)) - set(counts))
        run.duplicated = sorted(n for n, c in counts.items() if c > 1)
        run.replayed = _replayed(metrics, config.edge_id, config.site)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        device.close(5)
        metrics.stop()
        broker.close()
        run.seconds = time.monotonic() - started
    return run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--records", type=int, default=3000)
    ap.add_argument("--rate", type=float, default=200.0, help="records per second the device publishes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "edge_kill.json")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="megace-edge-kill-") as tmp:
        run = edge_kill_run(args.kills, args.records, workdir=Path(tmp), seed=args.seed, rate_hz=args.rate)
    result = {
        "command": "python -m tests.reliability.edge_kill " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": platform.node(), "loadavg_at_end": os.getloadavg()[0],
        **asdict(run), "lost_count": len(run.lost), "duplicated_count": len(run.duplicated),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("lost", "duplicated")}, indent=2))
    return 0 if not run.lost and not run.duplicated else 1


if __name__ == "__main__":
    raise SystemExit(main())
