"""Load test: 1,000 devices x 10 records/s x 60 s against one real edge process; loss, RSS, ingest rate.

    python bench/load_test.py [--devices 1000] [--workers 4] [--rate 10] [--duration 60]
                              [--variants fsync,nofsync,fsync-inflight200] [--out bench/results/load_test.json]
                              [--plot bench/results/load_rss.png]

The default (``--variants fsync``) is one run: ~60 s of load plus setup and drain. Each variant is:

* a private Mosquitto (:class:`broker.runners.MosquittoBroker`, its generated config; ``-inflightN``
  variants only change ``max_inflight_messages`` from 20 to N, see :class:`TunedMosquitto`);
* a real edge agent, ``python -m edge_agent --config FILE`` (config from
  ``tests.support.edge_testkit.edge_config``): replay buffer caps lifted so nothing is evicted
  (``replay_max_total`` = all records + 1000, ``replay_max_per_device`` 0), ``max_devices`` above the
  device count, training held off (``min_new_samples`` 10**9 unless ``--min-new-samples``), and
  ``ingest_fsync`` true (``fsync``) or false (``nofsync``);
* ``--devices`` device sessions in ``--workers`` processes (:mod:`bench.load_devices` says exactly what
  is simulated and why not 1,000 DeviceClient instances), each registering (retained) and then
  publishing numbered labelled feature records at ``--rate`` per second for ``--duration`` s, QoS 1;
  every PUBACK is counted per device and record number.

Then the run waits (``--drain-timeout``) until the edge's metrics (``megace/v1/metrics/edge/<id>``)
report every acknowledged record taken, stops the edge with SIGTERM and reads its committed
checkpoint: each record acknowledged by the broker must be in the replay buffer exactly once
(the device index and record number ride in the ``env`` modality's first two elements).
Lost = PUBACKed to a device but not in the checkpoint; duplicated = in it more than once.

Sampled every second: RSS and CPU of the edge and the broker (psutil), what the devices sent and had
acknowledged, the edge's ``samples_total``, ``ingest_commits``, ``ingest_logged``. Written: the JSON
(summary per variant + the 1 Hz series) and a plot of RSS, ingest rate and backlog over time.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import psutil
from load_devices import WorkerResult, device_name, run_worker

import broker.runners.mosquitto as mosquitto_runner
from broker import topics
from broker.address import BrokerAddress
from broker.runners import MosquittoBroker
from edge_agent.state import StateStore
from tests.support.collector import Collector

REPO = Path(__file__).resolve().parent.parent
METRIC_KEYS = ("samples_total", "ingest_commits", "ingest_logged", "mqtt_dropped", "duplicates", "rejected",
               "registrations", "messages_in")


class TunedMosquitto(MosquittoBroker):
    """The runner's Mosquitto with another ``max_inflight_messages`` (the runner has no knob for it).

    Swaps the runner's config template while :meth:`start` writes the config; everything else is the runner's.
    """

    def __init__(self, *, max_inflight: int = 20, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_inflight = max_inflight

    def start(self) -> TunedMosquitto:
        original = mosquitto_runner.CONFIG_TEMPLATE
        tuned = original.replace("max_inflight_messages 20\n", f"max_inflight_messages {self.max_inflight}\n")
        if tuned == original and self.max_inflight != 20:
            raise RuntimeError("the runner's config template no longer says max_inflight_messages 20")
        mosquitto_runner.CONFIG_TEMPLATE = tuned
        try:
            super().start()
        finally:
            mosquitto_runner.CONFIG_TEMPLATE = original
        return self


@dataclass(frozen=True)
class Variant:
    name: str
    fsync: bool
    inflight: int

    @classmethod
    def parse(cls, name: str) -> Variant:
        m = re.fullmatch(r"(no)?fsync(?:-inflight(\d+))?", name)
        if m is None:
            raise argparse.ArgumentTypeError(f"variant {name!r}: expected fsync|nofsync[-inflightN]")
        return cls(name, fsync=m.group(1) is None, inflight=int(m.group(2) or 20))


def fsync_latency_ms(directory: Path, n: int = 300) -> dict[str, float]:
    """fsync of a 3 KB append (about one group commit) on ``directory``'s disk: p50/p99 in ms."""
    path = directory / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    lat = []
    try:
        for _ in range(n):
            os.write(fd, b"x" * 3000)
            t = time.perf_counter()
            os.fsync(fd)
            lat.append(time.perf_counter() - t)
    finally:
        os.close(fd)
        path.unlink()
    a = np.asarray(lat) * 1e3
    return {"p50": round(float(np.percentile(a, 50)), 3), "p99": round(float(np.percentile(a, 99)), 3)}


class Sampler(threading.Thread):
    """Once a second: RSS/CPU of edge and broker, device-side progress, the edge's latest metrics."""

    def __init__(self, edge_pid: int, broker_pid: int, metrics: Collector, topic: str, progress: Any,
                 workers: int) -> None:
        super().__init__(daemon=True, name="load-sampler")
        self.procs = {"edge": psutil.Process(edge_pid), "broker": psutil.Process(broker_pid)}
        self.metrics, self.topic, self.progress, self.workers = metrics, topic, progress, workers
        self.rows: list[dict[str, Any]] = []
        self.stop_event = threading.Event()

    def latest(self) -> dict[str, Any]:
        for t, p, _ in reversed(list(self.metrics.raw)):
            if t == self.topic:
                return dict(json.loads(p)["metrics"])
        return {}

    def sample(self) -> dict[str, Any]:
        row: dict[str, Any] = {"t": time.time()}
        for name, proc in self.procs.items():
            try:  # the edge with its children (its receiver process, inference workers): what it costs the host
                tree = [proc, *proc.children(recursive=True)]
                times = [p.cpu_times() for p in tree]
                row[f"{name}_rss_mb"] = round(sum(p.memory_info().rss for p in tree) / 2**20, 1)
                row[f"{name}_cpu_s"] = round(sum(c.user + c.system for c in times), 3)
            except psutil.Error:
                row[f"{name}_rss_mb"] = None
                row[f"{name}_cpu_s"] = None
        row["sent"] = sum(self.progress[2 * w] for w in range(self.workers))
        row["acked"] = sum(self.progress[2 * w + 1] for w in range(self.workers))
        m = self.latest()
        for key in METRIC_KEYS:
            row[key] = int(m.get(key, 0)) if m else None
        row["loadavg1"] = os.getloadavg()[0]
        return row

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.rows.append(self.sample())
            self.stop_event.wait(1.0)

    def stop(self) -> list[dict[str, Any]]:
        self.stop_event.set()
        self.join(5)
        return self.rows


def _wait_metric(sampler_or_collector: Sampler, key: str, target: int, timeout: float,
                 alive: subprocess.Popen[bytes]) -> float | None:
    """Seconds until the edge reports ``key >= target`` (None on timeout); raises if the edge died."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        m = sampler_or_collector.latest()
        if m and int(m.get(key, 0)) >= target:
            return time.monotonic() - t0
        if alive.poll() is not None:
            raise RuntimeError(f"the edge exited with {alive.returncode}")
        time.sleep(0.2)
    return None


def _interp(rows: list[dict[str, Any]], key: str, t: float) -> float:
    pts = [(r["t"], r[key]) for r in rows if r.get(key) is not None]
    if not pts:
        return float("nan")
    ts, vs = zip(*pts, strict=True)
    return float(np.interp(t, ts, vs))


def run_variant(v: Variant, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from tests.support.edge_testkit import edge_config, uid  # imports torch: not in the device workers

    per_device = round(args.rate * args.duration)
    total = per_device * args.devices
    broker = TunedMosquitto(max_inflight=v.inflight, state_dir=workdir / "broker").start()
    addr = BrokerAddress(broker.host, broker.port)
    state = workdir / "state"
    config = edge_config(state, addr, {
        "site": uid("load"), "edge_id": uid("edge"), "ingest_fsync": v.fsync, "metrics_interval_s": 1.0,
        "log_level": "WARNING",
        "training": {"min_new_samples": args.min_new_samples, "interval_s": args.train_interval},
        "limits": {"replay_max_total": total + 1000, "replay_max_per_device": 0,
                   "max_devices": args.devices + 100, "mqtt_queue": args.mqtt_queue},
    })
    config_path = config.write(workdir / "edge.toml")
    metrics_topic = topics.metrics(topics.Role.EDGE, config.edge_id, config.site)
    metrics = Collector(addr, metrics_topic).start()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    log_path = workdir / "edge.log"
    with open(log_path, "ab") as log:
        edge = subprocess.Popen([sys.executable, "-m", "edge_agent", "--config", str(config_path)], cwd=REPO,
                                env=env, stdout=log, stderr=subprocess.STDOUT)
    ctx = mp.get_context("spawn")
    progress = ctx.Array("q", 2 * args.workers, lock=False)
    start_at = ctx.Value("d", 0.0, lock=False)
    ready = ctx.Semaphore(0)
    results_q = ctx.Queue()
    procs: list[Any] = []
    sampler: Sampler | None = None
    out: dict[str, Any] = {"variant": v.name, "ingest_fsync": v.fsync, "broker_max_inflight_messages": v.inflight}
    try:
        sampler = Sampler(edge.pid, broker.pid or 0, metrics, metrics_topic, progress, args.workers)
        if _wait_metric(sampler, "samples_total", 0, 180, edge) is None:
            raise RuntimeError("the edge never published metrics")
        sampler.start()
        split = np.array_split(np.arange(args.devices), args.workers)
        for w, idx in enumerate(split):
            p = ctx.Process(target=run_worker, name=f"load-worker-{w}", args=(
                w, int(idx[0]), len(idx), addr.host, addr.port, config.site, args.rate, args.duration,
                start_at, ready, progress, results_q), daemon=True)
            p.start()
            procs.append(p)
        for _ in procs:
            if not ready.acquire(timeout=180):
                raise RuntimeError("a device worker did not connect and register in 180 s")
        # every device registered at the broker; the edge must have taken the registrations too
        if _wait_metric(sampler, "registrations", args.devices, 60, edge) is None:
            raise RuntimeError("the edge did not take every registration")
        load_start = time.time() + 1.0
        start_at.value = load_start
        results: list[WorkerResult] = []
        deadline = time.monotonic() + args.duration + 300
        while len(results) < len(procs):
            try:
                results.append(results_q.get(timeout=1.0))
            except queue.Empty:
                dead = [p.name for p in procs if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(f"device workers failed: {dead or 'timeout'}") from None
        for p in procs:
            p.join(30)
        acked_total = sum(r.acked_total for r in results)
        drain_s = _wait_metric(sampler, "samples_total", acked_total, args.drain_timeout, edge)
        drained_at = time.time()
        before_stop = sampler.sample()
        edge.send_signal(signal.SIGTERM)
        t_term = time.monotonic()
        edge.wait(600)
        stop_s = time.monotonic() - t_term
        rows = sampler.stop()
        sampler = None
    finally:
        if sampler is not None:
            sampler.stop()
        for p in procs:
            if p.is_alive():
                p.kill()
        if edge.poll() is None:
            edge.kill()
            edge.wait(10)
        metrics.stop()
        broker.close()

    # --------------------------------------------------------------- check the checkpoint
    store = StateStore(state)
    samples = store.read(store.candidates()[0]).samples
    counts = np.zeros((args.devices, per_device), np.int32)
    foreign = 0
    for s in samples:
        env_vals = np.asarray(s.modalities["env"]).ravel()
        d, n = int(env_vals[0]), int(env_vals[1])
        if s.device_id != device_name(d) or not 0 <= n < per_device:
            foreign += 1
            continue
        counts[d, n] += 1
    acked = np.zeros((args.devices, per_device), bool)
    for r in results:
        for name, bits in r.acked.items():
            acked[int(name.rsplit("-", 1)[1])] = np.frombuffer(bits, np.uint8).astype(bool)
    lost = int(np.sum(acked & (counts == 0)))
    duplicated = int(np.sum(counts > 1))
    unacked_but_ingested = int(np.sum(~acked & (counts > 0)))

    # ------------------------------------------------------------------------ figures
    load_end = load_start + args.duration
    t_load = [r for r in rows if load_start <= r["t"] <= load_end]
    ingested_in_load = _interp(rows, "samples_total", load_end) - _interp(rows, "samples_total", load_start)
    edge_cpu = (_interp(rows, "edge_cpu_s", load_end) - _interp(rows, "edge_cpu_s", load_start)) / args.duration
    broker_cpu = (_interp(rows, "broker_cpu_s", load_end) - _interp(rows, "broker_cpu_s", load_start)) / args.duration
    ingest_end = drained_at if drain_s is not None else before_stop["t"]
    commits = int(before_stop["ingest_commits"] or 0) - _interp(rows, "ingest_commits", load_start)
    logged = int(before_stop["ingest_logged"] or 0) - _interp(rows, "ingest_logged", load_start)
    rss_edge = [r["edge_rss_mb"] for r in rows if r["edge_rss_mb"] is not None]
    rss_broker = [r["broker_rss_mb"] for r in rows if r["broker_rss_mb"] is not None]
    pre = [r for r in rows if r["t"] <= load_start] or rows[:1]
    rate_series = np.diff([r["samples_total"] or 0 for r in rows]) / np.maximum(np.diff([r["t"] for r in rows]), 1e-3)
    out.update({
        "devices": args.devices, "workers": args.workers, "records_per_device": per_device,
        "offered_per_s": args.devices * args.rate,
        "sent": sum(r.published for r in results),
        "acked_by_broker": acked_total,
        "device_publish_s": max(r.publish_s for r in results),
        "device_late_ticks": sum(r.late_ticks for r in results),
        "device_disconnects": sum(r.disconnects for r in results),
        "device_ack_latency_ms_worst_worker": {k: round(max(r.ack_latency_ms[k] for r in results), 2)
                                               for k in ("p50", "p99", "max")},
        "device_workers_cpu_cores": round(sum(r.cpu_s for r in results) / args.duration, 3),
        "edge_ingest_per_s_during_load": round(ingested_in_load / args.duration, 1),
        "edge_ingest_per_s_overall": round((before_stop["samples_total"] or 0) / (ingest_end - load_start), 1),
        "edge_ingest_per_s_peak_1s": round(float(rate_series.max()) if len(rate_series) else 0.0, 1),
        "drained": drain_s is not None,
        "drain_after_load_s": round(ingest_end - load_end, 1),
        "backlog_at_load_end": int(_interp(rows, "acked", load_end) - _interp(rows, "samples_total", load_end)),
        "edge_samples_total": before_stop["samples_total"],
        "edge_duplicates": before_stop["duplicates"], "edge_mqtt_dropped": before_stop["mqtt_dropped"],
        "edge_rejected": before_stop["rejected"],
        "in_checkpoint": len(samples), "lost": lost, "duplicated": duplicated,
        "ingested_without_device_ack": unacked_but_ingested, "foreign_samples": foreign,
        "ingest_commits_per_s": round(commits / (ingest_end - load_start), 1),
        "frames_per_commit": round(logged / commits, 2) if commits else None,
        "edge_cpu_cores_during_load": round(edge_cpu, 3), "broker_cpu_cores_during_load": round(broker_cpu, 3),
        "edge_rss_mb": {"start": pre[-1]["edge_rss_mb"],
                        "end_of_load": round(_interp(rows, "edge_rss_mb", load_end), 1),
                        "drained": before_stop["edge_rss_mb"], "max": max(rss_edge)},
        "broker_rss_mb": {"start": pre[-1]["broker_rss_mb"],
                          "end_of_load": round(_interp(rows, "broker_rss_mb", load_end), 1),
                          "drained": before_stop["broker_rss_mb"], "max": max(rss_broker)},
        "edge_rss_kb_per_buffered_sample": round(
            (before_stop["edge_rss_mb"] - pre[-1]["edge_rss_mb"]) * 1024 / max(1, before_stop["samples_total"] or 0),
            3),
        "edge_sigterm_to_exit_s": round(stop_s, 1),
        "loadavg1_during_load": round(float(np.mean([r["loadavg1"] for r in t_load])) if t_load else -1.0, 2),
        "series": [{**r, "t": round(r["t"] - load_start, 2)} for r in rows],
    })
    return out


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(10, 10), sharex=True)
    for i, run in enumerate(runs):
        color = f"C{i}"
        s = run["series"]
        t = np.array([r["t"] for r in s])
        axes[0].plot(t, [r["edge_rss_mb"] for r in s], color=color, label=f"{run['variant']}: edge")
        axes[0].plot(t, [r["broker_rss_mb"] for r in s], color=color, ls="--", label=f"{run['variant']}: broker")
        done = np.array([r["samples_total"] or 0 for r in s], float)
        rate = np.diff(done) / np.maximum(np.diff(t), 1e-3)
        axes[1].plot(t[1:], rate, color=color, label=f"{run['variant']}: edge ingest")
        backlog = np.array([r["acked"] for r in s], float) - done
        axes[2].plot(t, np.maximum(backlog, 0), color=color, label=run["variant"])
    offered = runs[0]["offered_per_s"]
    axes[1].axhline(offered, color="k", ls=":", label=f"offered {offered:,}/s")
    for ax in axes:
        ax.axvline(0, color="grey", lw=0.5)
        ax.axvline(runs[0]["device_publish_s"], color="grey", lw=0.5)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    axes[0].set_ylabel("RSS (MiB)")
    axes[1].set_ylabel("records/s (1 s)")
    axes[2].set_ylabel("backlog (acked by broker,\nnot yet taken by edge)")
    axes[2].set_xlabel("s since load start (grey: load start/end)")
    fig.suptitle(f"{runs[0]['devices']} devices x {offered // runs[0]['devices']}/s for "
                 f"{runs[0]['records_per_device'] // max(1, offered // runs[0]['devices'])} s, one edge")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--rate", type=float, default=10.0, help="records/s per device")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    ap.add_argument("--variants", default="fsync", help="comma-separated: fsync|nofsync[-inflightN]")
    ap.add_argument("--min-new-samples", type=int, default=10**9, help="edge training.min_new_samples")
    ap.add_argument("--train-interval", type=float, default=10.0**6, help="edge training.interval_s")
    ap.add_argument("--drain-timeout", type=float, default=300.0)
    ap.add_argument("--mqtt-queue", type=int, default=10_000,
                    help="edge limits.mqtt_queue (aiomqtt's incoming queue; the edge's default is 10,000)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "load_test.json")
    ap.add_argument("--plot", type=Path, default=REPO / "bench" / "results" / "load_rss.png")
    args = ap.parse_args(argv)
    variants = [Variant.parse(n.strip()) for n in args.variants.split(",") if n.strip()]
    if args.devices * args.rate * args.duration / args.devices >= 2**24:
        raise SystemExit("too many records per device to number exactly in float32")
    runs = []
    loadavg_start = os.getloadavg()
    for v in variants:
        with tempfile.TemporaryDirectory(prefix="megace-load-") as tmp:
            fsync_ms = fsync_latency_ms(Path(tmp))
            print(f"[{v.name}] fsync p50 {fsync_ms['p50']} ms; running ...", flush=True)
            run = run_variant(v, args, Path(tmp))
            run["fsync_latency_ms"] = fsync_ms
            runs.append(run)
            print(json.dumps({k: val for k, val in run.items() if k != "series"}, indent=1), flush=True)
    result = {
        "command": "python bench/load_test.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": platform.node(), "cpus": os.cpu_count(), "loadavg_at_start": loadavg_start,
        "loadavg_at_end": os.getloadavg(),
        "simulated": ("per device: its own paho MQTT 3.1.1 connection, clean_session=False, client id megace-dev-<id>, "
                      "TCP_NODELAY, retained QoS 1 will, in-flight window 100, downlink subscription QoS 1, retained "
                      "online status and registration, then FEATURES envelopes (broker.wire.encode_envelope) at QoS 1; "
                      "all of a worker process's connections on one epoll loop instead of DeviceClient's 2 threads per "
                      "device; no on-disk store-and-forward (a disconnect would be reported, none is expected); "
                      "see bench/load_devices.py"),
        "edge": {"training.min_new_samples": args.min_new_samples, "training.interval_s": args.train_interval,
                 "limits.replay_max_total": "records + 1000", "limits.replay_max_per_device": 0,
                 "limits.max_devices": args.devices + 100, "limits.mqtt_queue": args.mqtt_queue,
                 "note": "training held off unless --min-new-samples is given: this measures ingest"},
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(runs, args.plot)
    ok = all(r["lost"] == 0 and r["duplicated"] == 0 and r["drained"] for r in runs)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
