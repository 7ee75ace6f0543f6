"""kill -9 of the edge, the cloud and the broker of a whole running system, at random moments, under load.

One private Mosquitto with the durable profile of ``deploy/mosquitto/durability.conf`` (a save after
every change), one cloud aggregator (``python -m cloud_aggregator --config``), ``--edges`` edge agents
(``python -m edge_agent --config``, tiny toy backbone, a round every 40 new samples) and per edge
``--devices-per-edge`` real :class:`DeviceClient` devices. Each device streams numbered, labelled
records at QoS 1 (the number rides in the ``env`` modality's first element, as in ``edge_kill.py``)
and now and then asks its edge for a prediction, noting the ``Prediction`` or ``ErrorReport`` it gets
back. Edges train, upload their shared adapters; the cloud aggregates (FedBuff, K = edges, 3 s timer)
and publishes retained globals and per-site feedback. Meanwhile one kind of process is SIGKILLed and
restarted at random moments (a *phase* per fault kind, each on a fresh system).

At the end the devices flush (every record PUBACKed), the edges are stopped with SIGTERM, then the
cloud, and the durable state is read back:

* records: every acknowledged record must be in its edge's committed replay buffer exactly once
  (broker kills: Mosquitto 2.0 may lose about one acknowledged record per publishing connection per
  kill; those losses are attributed to the kill that followed them and compared with that bound);
* uploads: the cloud's ledger holds each (edge, upload seq) at most once, its metrics agree, and every
  upload the edge made is either in the ledger or listed (``uploads_missing``) with the cloud's refusals;
* versions: every global seen on the bus (retained ``megace/v1/cloud/down/global``) is in the ledger, no
  version number is seen with two contents (a fork), and a version lower than one already seen (a
  regression, e.g. an old retained global a restarted broker hands out) is counted;
* predictions: each request got a ``Prediction`` or an ``ErrorReport`` within ``--answer-timeout``.

    python -m tests.reliability.system_kill --kills 10 [--faults edge,cloud,broker] [--out FILE]
    python -m tests.reliability.system_kill --repro cloud-upload-loss|edge-inference-loss|reconnect-duplicate
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt

from broker import topics
from broker.address import BrokerAddress
from broker.errors import WireError
from broker.inbox import Inbox
from broker.runners import MosquittoBroker
from broker.wire import GlobalAdapter, Kind
from broker.wire.bodies import decode_body
from cloud_aggregator.config import load_cloud_config, write_cloud_config
from device_sdk import DeviceClient
from edge_agent.state import StateStore
from edge_agent.training.toy_task import ToyTask
from megace.loop.children import CHILD_ENV
from tests.support.edge_testkit import edge_config, record, toy_profile

REPO = Path(__file__).resolve().parents[2]
FAULTS = ("edge", "cloud", "broker")
CLOUD_ID = "cloud-kill"
RECORD_SPACE = 1_000_000  # device d numbers its records d * RECORD_SPACE + i (exact in float32 below 2**24)
REQUEST_BASE = 900_000  # inference request ids: d * RECORD_SPACE + REQUEST_BASE + k


# ------------------------------------------------------------------------------------------ processes
class Service:
    """One service process (``python -m edge_agent|cloud_aggregator --config FILE``), killable and restartable."""

    def __init__(self, name: str, module: str, config: Path, log: Path) -> None:
        self.name, self.module, self.config, self.log = name, module, config, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> Service:
        env = {**os.environ, **CHILD_ENV}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", self.module, "--config", str(self.config)], cwd=REPO,
                                         env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        self.starts += 1
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 60.0) -> int | None:
        """SIGTERM and wait (the clean shutdown systemd does); SIGKILL if it does not exit in time."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            return None

    def ensure_dead(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def tracebacks(self) -> int:
        try:
            return self.log.read_text(errors="replace").count("Traceback")
        except OSError:
            return 0

    def first_traceback(self) -> str:
        """The log from the line before the first traceback on (a few lines): what a failed run shows."""
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        at = next((i for i, line in enumerate(lines) if "Traceback" in line), None)
        return "" if at is None else "\n".join(lines[max(at - 1, 0):at + 25])


# ------------------------------------------------------------------------------------------- the bus tap
@dataclass(slots=True)
class SeenGlobal:
    t: float
    version: int
    digest: str
    retained: bool


def global_digest(g: GlobalAdapter) -> str:
    """The content of a global: its tensors (names, dtypes, shapes, bytes), base, rank, alpha, contributors."""
    h = hashlib.sha256(f"{g.base_model}|{g.strategy}|{g.rank}|{g.alpha}|{sorted(g.contributors)}".encode())
    for name in sorted(g.tensors):
        a = np.ascontiguousarray(g.tensors[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


class Tap:
    """A clean-session observer: every global adapter on the bus (decoded), and the services' metrics."""

    def __init__(self, addr: BrokerAddress, edges: list[tuple[str, str]]) -> None:
        self.globals: list[SeenGlobal] = []
        self.metrics: dict[str, dict[str, Any]] = {}  # latest metrics per service
        self.arrivals: dict[str, list[float]] = {}  # when each service's metrics arrived
        self.decode_errors = 0
        self._lock = threading.Lock()
        self._inbox = Inbox()
        self._global = topics.global_down()
        self._metric_topics = {topics.metrics(topics.Role.EDGE, e, site): e for e, site in edges}
        self._metric_topics[topics.metrics(topics.Role.CLOUD, CLOUD_ID)] = CLOUD_ID
        self.filters = [*topics.subscriptions(self._global), *self._metric_topics]
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"kill-tap-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv311, clean_session=True)
        self.client.on_connect = lambda c, *a: c.subscribe([(f, 1) for f in self.filters])
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.05, 0.5)
        self.addr = addr

    def start(self) -> Tap:
        self.client.connect(self.addr.host, self.addr.port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise TimeoutError("the tap never subscribed")
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        topic, payload = msg.topic, bytes(msg.payload)
        if topic in self._metric_topics:
            try:
                doc = json.loads(payload)["metrics"]
            except (ValueError, KeyError, TypeError):
                return
            with self._lock:
                self.metrics[self._metric_topics[topic]] = doc
                self.arrivals.setdefault(self._metric_topics[topic], []).append(time.monotonic())
            return
        if not payload:
            return  # a retained topic being cleared
        try:
            got = self._inbox.accept(topic, payload)
            if got is None:
                return
            body = decode_body(got[1])
        except WireError:
            with self._lock:
                self.decode_errors += 1
            return
        if isinstance(body, GlobalAdapter):
            with self._lock:
                self.globals.append(SeenGlobal(time.monotonic(), int(body.version), global_digest(body),
                                               bool(msg.retain)))

    def latest(self, ident: str) -> dict[str, Any]:
        with self._lock:
            return dict(self.metrics.get(ident, {}))

    def back_after(self, ident: str, t: float) -> float | None:
        """Seconds from ``t`` to the first metrics of ``ident`` after it (a restarted service is serving)."""
        with self._lock:
            return next((a - t for a in self.arrivals.get(ident, []) if a > t), None)

    def max_version(self) -> int:
        with self._lock:
            return max((g.version for g in self.globals), default=-1)

    def seen(self) -> list[SeenGlobal]:
        with self._lock:
            return list(self.globals)


# --------------------------------------------------------------------------------------------- devices
def numbered(task: ToyTask, n: int) -> dict[str, Any]:
    """A toy sample whose ``env`` modality carries ``n`` in its first element (exact in float32)."""
    sample = task.sample()
    env = np.array(sample["modalities"].get("env", np.zeros(8, np.float32)), dtype=np.float32).reshape(-1)
    env[0] = float(n)
    sample["modalities"] = {**sample["modalities"], "env": env}
    return sample


class SimDevice:
    """A real DeviceClient streaming numbered records and, every ``infer_every`` records, an inference request."""

    def __init__(self, index: int, site: str, addr: BrokerAddress, workdir: Path, task: ToyTask, *,
                 rate_hz: float, infer_every: int) -> None:
        self.index, self.site = index, site
        self.name = f"dev-{index}"
        self.base = index * RECORD_SPACE
        self.task, self.rate_hz, self.infer_every = task, rate_hz, infer_every
        self.published = 0  # records 0 .. published-1 were handed to the SDK
        self.requests: dict[int, tuple[int, float]] = {}  # request id -> (envelope seq, sent at)
        self.answered: dict[int, float] = {}  # request id -> first Prediction's arrival
        self.error_reports: list[tuple[int | None, str]] = []  # (ref = the refused envelope's seq, code)
        self.duplicate_answers = 0
        self._lock = threading.Lock()
        self.client = DeviceClient(site, self.name, addr, on_downlink=self._on_downlink,
                                   store_path=workdir / f"{self.name}.sqlite")

    def _on_downlink(self, kind: Kind, msg: Any) -> None:
        now = time.monotonic()
        with self._lock:
            if kind is Kind.PREDICTION:
                rid = int(msg.sample)
                if rid in self.answered:
                    self.duplicate_answers += 1
                else:
                    self.answered[rid] = now
            elif kind is Kind.ERROR:
                self.error_reports.append((msg.ref, str(msg.code)))

    def start(self) -> None:
        if not self.client.connect(30):
            raise TimeoutError(f"{self.name} could not connect")
        self.client.register(toy_profile(self.name))

    def stream(self, stop: threading.Event) -> None:
        period = 1.0 / self.rate_hz
        k = 0
        while not stop.is_set():
            i = self.published
            self.client.publish(record(self.name, self.base + i, numbered(self.task, self.base + i)))
            self.published += 1
            if self.infer_every and self.published % self.infer_every == 0:
                rid = self.base + REQUEST_BASE + k
                k += 1
                sent = time.monotonic()
                # never hold self._lock here: the downlink callback takes it on paho's thread
                seq = self.client.request_inference(record(self.name, rid, self.task.sample(), label=False))
                with self._lock:
                    self.requests[rid] = (seq, sent)
            time.sleep(period)

    def errored(self) -> dict[int, str]:
        """Request id -> the code of the first ErrorReport that refers to it."""
        with self._lock:
            by_seq = {seq: rid for rid, (seq, _) in self.requests.items()}
            out: dict[int, str] = {}
            for ref, code in self.error_reports:
                if ref is not None and ref in by_seq:
                    out.setdefault(by_seq[ref], code)
            return out

    def other_errors(self) -> dict[str, int]:
        """ErrorReports that refer to no inference request (refused records, registrations)."""
        with self._lock:
            seqs = {seq for seq, _ in self.requests.values()}
            return dict(Counter(code for ref, code in self.error_reports if ref not in seqs))

    def outstanding(self) -> list[int]:
        errored = self.errored()
        with self._lock:
            return [r for r in self.requests if r not in self.answered and r not in errored]

    def close(self) -> None:
        self.client.close(5)


# --------------------------------------------------------------------------------------------- results
@dataclass
class PhaseResult:
    """What one phase (one fault kind, or a mixed schedule) did and what survived it."""

    fault: str
    schedule: list[str]
    kills: dict[str, int] = field(default_factory=dict)
    seed: int = 0
    edges: int = 0
    devices: int = 0
    seconds: float = 0.0
    recovery_s: list[float | None] = field(default_factory=list)  # kill -> the service(s) publish metrics again
    # device records
    records_published: int = 0
    records_acked: int = 0
    records_in_checkpoints: int = 0
    records_lost: int = 0
    records_duplicated: int = 0
    records_unexpected: int = 0
    lost_sample: list[int] = field(default_factory=list)
    duplicated_sample: list[int] = field(default_factory=list)
    lost_per_broker_kill: list[int] = field(default_factory=list)  # the last entry: after the last kill
    broker_loss_bound: int = 0  # one record per publishing device connection per broker kill
    # uploads
    uploads_made: int = 0  # upload seqs the edges assigned (their final checkpoints)
    uploads_accepted: int = 0  # distinct (edge, seq) in the cloud's ledger
    uploads_accepted_twice: int = 0  # ledger rows beyond one per (edge, seq), plus metrics beyond the ledger
    uploads_applied_twice: int = 0
    uploads_missing: dict[str, list[int]] = field(default_factory=dict)  # made, never accepted, per edge
    cloud_metrics_accepted: int = 0
    cloud_rejected: dict[str, int] = field(default_factory=dict)
    uploads_pending_at_end: int = 0
    # versions
    versions_committed: int = 0  # the ledger's latest version
    ledger_versions_contiguous: bool = True
    globals_seen: int = 0
    versions_seen: int = 0
    versions_forked: int = 0
    forked: list[int] = field(default_factory=list)
    version_regressions: int = 0
    regression_sample: list[tuple[int, int, bool]] = field(default_factory=list)  # (seen, after max, retained)
    versions_not_in_ledger: list[int] = field(default_factory=list)
    # predictions
    predictions_requested: int = 0
    predictions_answered: int = 0
    predictions_errored: int = 0
    predictions_unanswered: int = 0
    predictions_late: int = 0  # answered, but after the timeout
    predictions_duplicate_answers: int = 0
    error_codes: dict[str, int] = field(default_factory=dict)
    other_device_errors: dict[str, int] = field(default_factory=dict)  # ErrorReports about records etc.
    unanswered_sample: list[dict[str, Any]] = field(default_factory=list)
    # services
    edge_counters: dict[str, dict[str, Any]] = field(default_factory=dict)
    tracebacks: dict[str, int] = field(default_factory=dict)
    first_tracebacks: dict[str, str] = field(default_factory=dict)
    exit_codes: dict[str, int | None] = field(default_factory=dict)
    loadavg_at_start: list[float] = field(default_factory=list)
    loadavg_at_end: list[float] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- system
class System:
    """Broker + cloud + edges + devices in ``workdir``; ``kill(kind)`` SIGKILLs and restarts one part."""

    def __init__(self, workdir: Path, *, edges: int, devices_per_edge: int, rate_hz: float, infer_every: int,
                 seed: int) -> None:
        self.workdir = workdir
        self.rng = random.Random(seed)
        self.broker = MosquittoBroker(state_dir=workdir / "broker", autosave_on_changes=True, autosave_interval=1)
        self.addr = BrokerAddress(self.broker.host, self.broker.port)
        self.edge_cfgs = []
        self.edges: list[Service] = []
        for e in range(edges):
            cfg = edge_config(workdir / f"edge-{e}", self.addr, {
                "site": f"site-{e}", "edge_id": f"edge-{e}", "metrics_interval_s": 0.5, "log_level": "WARNING",
                "training": {"min_new_samples": 40, "interval_s": 3600.0, "steps": 4, "batch_size": 16,
                             "startup_grace_s": 0.3},
                "limits": {"replay_max_total": 500_000, "replay_max_per_device": 0},
            })
            self.edge_cfgs.append(cfg)
            path = cfg.write(workdir / f"edge-{e}.toml")
            self.edges.append(Service(cfg.edge_id, "edge_agent", path, workdir / f"edge-{e}.log"))
        model = self.edge_cfgs[0].model.to_dict()
        cloud = load_cloud_config(None, {
            "cloud_id": CLOUD_ID, "broker": f"mqtt://{self.addr.host}:{self.addr.port}",
            "state_dir": str(workdir / "cloud"), "model": model,
            "aggregation": {"strategy": "fedavg", "buffer_k": edges, "buffer_period_s": 3.0},
            "limits": {"metrics_period_s": 0.5, "torch_threads": 1},
        }, environ={})
        self.cloud_state = Path(cloud.state_dir)
        self.cloud = Service(CLOUD_ID, "cloud_aggregator", write_cloud_config(cloud, workdir / "cloud.toml"),
                             workdir / "cloud.log")
        task = ToyTask(self.edge_cfgs[0].model, seed=seed)
        self.devices = [SimDevice(e * devices_per_edge + d, self.edge_cfgs[e].site, self.addr, workdir, task,
                                  rate_hz=rate_hz, infer_every=infer_every)
                        for e in range(edges) for d in range(devices_per_edge)]
        self.device_edge = {dev.name: dev.index // devices_per_edge for dev in self.devices}
        self.tap = Tap(self.addr, [(c.edge_id, c.site) for c in self.edge_cfgs])
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.broker_marks: list[list[int]] = []  # per broker kill: records each device had published

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self, timeout: float = 180.0) -> None:
        self.broker.start()
        self.tap.start()
        self.cloud.start()
        for e in self.edges:
            e.start()
        self._until(lambda: self.tap.max_version() >= 0, timeout, "the cloud's first global")
        self._until(lambda: all(self.tap.latest(c.edge_id) for c in self.edge_cfgs), timeout, "every edge's metrics")
        for dev in self.devices:
            dev.start()
        self._threads = [threading.Thread(target=d.stream, args=(self._stop,), daemon=True) for d in self.devices]
        for t in self._threads:
            t.start()

    def kill(self, kind: str) -> tuple[list[str], float]:
        """SIGKILL one ``kind`` process and restart it at once; returns whom to wait for and when it restarted."""
        if kind == "edge":
            svc = self.rng.choice(self.edges)
            svc.kill()
            svc.start()
            return [svc.name], time.monotonic()
        if kind == "cloud":
            self.cloud.kill()
            self.cloud.start()
            return [CLOUD_ID], time.monotonic()
        if kind == "broker":
            self.broker_marks.append([d.published for d in self.devices])
            self.broker.stop(kill=True)
            time.sleep(self.rng.uniform(0.0, 0.2))
            self.broker.start()
            return [CLOUD_ID, *(e.name for e in self.edges)], time.monotonic()
        raise ValueError(kind)

    def recovery(self, kills: list[tuple[list[str], float]]) -> list[float | None]:
        """Per kill: seconds until every service it hit published metrics again (None: not before the end)."""
        out: list[float | None] = []
        for idents, t in kills:
            backs = [self.tap.back_after(i, t) for i in idents]
            out.append(None if None in backs else round(max(b for b in backs if b is not None), 2))
        return out

    def stop_streaming(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def close(self) -> None:
        self._stop.set()
        for dev in self.devices:
            with contextlib.suppress(Exception):  # best effort at teardown
                dev.close()
        for svc in [*self.edges, self.cloud]:
            svc.ensure_dead()
        self.tap.stop()
        self.broker.close()

    @staticmethod
    def _until(pred: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            time.sleep(0.1)

    def _settle(self, value: Any, target: Any, quiet_s: float, timeout: float) -> None:
        """Until ``value()`` reaches ``target()`` or stops changing for ``quiet_s``."""
        last, since, deadline = None, time.monotonic(), time.monotonic() + timeout
        while time.monotonic() < deadline:
            v = value()
            if v >= target():
                return
            if v != last:
                last, since = v, time.monotonic()
            elif time.monotonic() - since > quiet_s:
                return
            time.sleep(0.2)

    # -- the end ------------------------------------------------------------------------------------
    def finish(self, out: PhaseResult, answer_timeout: float) -> None:
        """Flush devices, let every answer arrive, stop edges then cloud cleanly, read back durable state."""
        self.stop_streaming()
        for dev in self.devices:
            if not dev.client.flush(180):
                raise AssertionError(f"{dev.name} could not get every record acknowledged")
        # every request gets ``answer_timeout`` from its sending to be answered
        last_sent = max((t for d in self.devices for _, t in d.requests.values()), default=time.monotonic())
        deadline = last_sent + answer_timeout
        while time.monotonic() < deadline and any(d.outstanding() for d in self.devices):
            time.sleep(0.2)
        per_edge = [sum(d.published for d in self.devices if self.device_edge[d.name] == e)
                    for e in range(len(self.edges))]

        def ingested() -> int:
            return sum(int(self.tap.latest(c.edge_id).get("samples_total", 0)) for c in self.edge_cfgs)

        self._settle(ingested, lambda: sum(per_edge), quiet_s=8.0, timeout=180)
        for svc in self.edges:
            out.exit_codes[svc.name] = svc.terminate(120)
        made = [StateStore(c.state_dir).read(StateStore(c.state_dir).candidates()[0]) for c in self.edge_cfgs]
        made_total = sum(g.state.upload_seq for g in made)
        self._settle(lambda: int(self.tap.latest(CLOUD_ID).get("accepted", 0)), lambda: made_total,
                     quiet_s=5.0, timeout=60)
        time.sleep(1.0)
        cloud_metrics = self.tap.latest(CLOUD_ID)
        out.exit_codes[self.cloud.name] = self.cloud.terminate(60)
        for dev in self.devices:
            dev.close()
        self._count_records(out, made)
        self._count_uploads(out, made, cloud_metrics)
        self._count_versions(out)
        self._count_predictions(out, answer_timeout)
        for c, g in zip(self.edge_cfgs, made, strict=True):
            m = self.tap.latest(c.edge_id)
            out.edge_counters[c.edge_id] = {k: m.get(k) for k in (
                "samples_total", "ingest_replayed", "rounds", "uploads", "globals_applied", "global_stale",
                "rejected", "infer_requests") if k in m} | {"upload_seq": g.state.upload_seq,
                                                             "global_version": g.state.global_version}
        out.tracebacks = {s.name: s.tracebacks() for s in [*self.edges, self.cloud]}
        out.first_tracebacks = {s.name: s.first_traceback() for s in [*self.edges, self.cloud] if s.tracebacks()}

    def _count_records(self, out: PhaseResult, gens: list[Any]) -> None:
        expected = {d.base + i for d in self.devices for i in range(d.published)}
        numbers = [int(np.asarray(s.modalities["env"]).ravel()[0]) for g in gens for s in g.samples]
        counts = Counter(numbers)
        lost = sorted(expected - set(counts))
        dup = sorted(n for n, c in counts.items() if c > 1)
        out.records_published = out.records_acked = len(expected)  # flush() returned: all PUBACKed
        out.records_in_checkpoints = len(numbers)
        out.records_lost, out.lost_sample = len(lost), lost[:50]
        out.records_duplicated, out.duplicated_sample = len(dup), dup[:50]
        out.records_unexpected = len(set(counts) - expected)
        if self.broker_marks:
            marks = [*self.broker_marks, [d.published for d in self.devices]]
            per = [0] * len(marks)
            for n in lost:
                d, i = divmod(n, RECORD_SPACE)
                per[next((k for k, m in enumerate(marks) if i < m[d]), len(marks) - 1)] += 1
            out.lost_per_broker_kill = per
            out.broker_loss_bound = len(self.broker_marks) * len(self.devices)

    def _count_uploads(self, out: PhaseResult, gens: list[Any], cloud_metrics: dict[str, Any]) -> None:
        db = sqlite3.connect(f"file:{self.cloud_state / 'ledger.sqlite'}?mode=ro", uri=True)
        try:
            rows = list(db.execute("SELECT edge_id, seq, status, applied_version FROM updates"))
            versions = [int(v) for (v,) in db.execute("SELECT version FROM globals ORDER BY version")]
        finally:
            db.close()
        keys = Counter((e, int(s)) for e, s, _, _ in rows)
        out.uploads_accepted = len(keys)
        out.uploads_applied_twice = sum(1 for _, _, st, v in rows if st == "applied" and v is None)
        out.cloud_metrics_accepted = int(cloud_metrics.get("accepted", 0))
        out.uploads_accepted_twice = sum(c - 1 for c in keys.values()) + max(0, out.cloud_metrics_accepted - len(rows))
        out.cloud_rejected = dict(cloud_metrics.get("rejected_reasons", {}))
        out.uploads_pending_at_end = sum(1 for _, _, st, _ in rows if st == "pending")
        out.uploads_made = sum(g.state.upload_seq for g in gens)
        for c, g in zip(self.edge_cfgs, gens, strict=True):
            missing = sorted(set(range(1, g.state.upload_seq + 1)) - {s for e, s in keys if e == c.edge_id})
            if missing:
                out.uploads_missing[c.edge_id] = missing
        out.versions_committed = versions[-1] if versions else -1
        out.ledger_versions_contiguous = versions == list(range(len(versions)))
        self._ledger_versions = set(versions)

    def _count_versions(self, out: PhaseResult) -> None:
        seen = self.tap.seen()
        out.globals_seen = len(seen)
        contents: dict[int, set[str]] = {}
        top = -1
        for g in seen:
            contents.setdefault(g.version, set()).add(g.digest)
            if g.version < top:
                out.version_regressions += 1
                if len(out.regression_sample) < 20:
                    out.regression_sample.append((g.version, top, g.retained))
            top = max(top, g.version)
        out.versions_seen = len(contents)
        out.forked = sorted(v for v, d in contents.items() if len(d) > 1)
        out.versions_forked = len(out.forked)
        out.versions_not_in_ledger = sorted(set(contents) - self._ledger_versions)

    def _count_predictions(self, out: PhaseResult, timeout: float) -> None:
        codes: Counter[str] = Counter()
        other: Counter[str] = Counter()
        for d in self.devices:
            errored = d.errored()
            other.update(d.other_errors())
            out.predictions_duplicate_answers += d.duplicate_answers
            for rid, (seq, sent) in list(d.requests.items()):
                out.predictions_requested += 1
                if rid in d.answered:
                    out.predictions_answered += 1
                    if d.answered[rid] - sent > timeout:
                        out.predictions_late += 1
                elif rid in errored:
                    out.predictions_errored += 1
                    codes[errored[rid]] += 1
                else:
                    out.predictions_unanswered += 1
                    if len(out.unanswered_sample) < 20:
                        out.unanswered_sample.append({"device": d.name, "request": rid, "seq": seq,
                                                      "sent_s": round(sent - self.t0, 2)})
        out.error_codes = dict(codes)
        out.other_device_errors = dict(other)

    t0 = 0.0


def run_phase(schedule: list[str], *, workdir: Path, seed: int = 0, edges: int = 2, devices_per_edge: int = 1,
              rate_hz: float = 20.0, infer_every: int = 5, gap_s: tuple[float, float] = (3.0, 8.0),
              warmup_s: float = 4.0, answer_timeout: float = 30.0, fault: str | None = None) -> PhaseResult:
    """Start a system, run the kill ``schedule`` (a kind per kill, at random moments), stop, count."""
    rng = random.Random(seed)
    out = PhaseResult(fault=fault or ("+".join(sorted(set(schedule))) if schedule else "none"), schedule=schedule,
                      seed=seed, edges=edges, devices=edges * devices_per_edge,
                      loadavg_at_start=[round(x, 2) for x in os.getloadavg()])
    out.kills = dict(Counter(schedule))
    system = System(workdir, edges=edges, devices_per_edge=devices_per_edge, rate_hz=rate_hz,
                    infer_every=infer_every, seed=seed)
    started = time.monotonic()
    try:
        system.start()
        system.t0 = time.monotonic()
        time.sleep(warmup_s)
        kills = []
        for kind in schedule:
            time.sleep(rng.uniform(*gap_s))
            kills.append(system.kill(kind))
        time.sleep(rng.uniform(*gap_s))
        system.finish(out, answer_timeout)
        out.recovery_s = system.recovery(kills)
    finally:
        system.close()
        out.seconds = round(time.monotonic() - started, 1)
        out.loadavg_at_end = [round(x, 2) for x in os.getloadavg()]
    return out


def summary(r: PhaseResult) -> str:
    return (f"{r.fault}: kills {r.kills}, records acked {r.records_acked} lost {r.records_lost} "
            f"{r.lost_per_broker_kill or ''} (bound {r.broker_loss_bound}) dup {r.records_duplicated}; "
            f"uploads made {r.uploads_made} accepted {r.uploads_accepted} twice {r.uploads_accepted_twice} "
            f"missing {sum(len(v) for v in r.uploads_missing.values())}; versions {r.versions_committed} "
            f"forked {r.versions_forked} regressions {r.version_regressions}; predictions "
            f"{r.predictions_requested} answered {r.predictions_answered} errored {r.predictions_errored} "
            f"unanswered {r.predictions_unanswered}; {r.seconds} s")


# ------------------------------------------------------------------------------ minimal reproductions
def repro_cloud_upload_loss(workdir: Path, uploads: int = 40, kill_after_s: float = 0.0,
                            kill: bool = True) -> dict[str, Any]:
    """Uploads the broker acknowledged to their edge, lost by one kill -9 of the cloud.

    A publisher does what the edge's outbox does (``edge_agent.uploads.Outbox``): publish each upload at
    QoS 1 and treat the broker's PUBACK as final (the edge confirms the seq and never sends it again). Right
    after the last PUBACK the cloud is SIGKILLed and restarted; every upload must end up in its ledger.
    """
    import zlib

    from megace_model.adapters import build_edge_model, shared_state
    from megace_model.fingerprint import base_fingerprint
    from tests.support.cloud_bus import perturbed, update_payload

    broker = MosquittoBroker(state_dir=workdir / "broker", autosave_on_changes=True, autosave_interval=1).start()
    addr = BrokerAddress(broker.host, broker.port)
    model = edge_config(workdir / "unused", addr).model
    cfg = load_cloud_config(None, {
        "cloud_id": CLOUD_ID, "broker": f"mqtt://{addr.host}:{addr.port}", "state_dir": str(workdir / "cloud"),
        "model": model.to_dict(), "aggregation": {"strategy": "fedavg", "buffer_k": 10_000},
        "limits": {"metrics_period_s": 0.5, "torch_threads": 1},
    }, environ={})
    cloud = Service(CLOUD_ID, "cloud_aggregator", write_cloud_config(cfg, workdir / "cloud.toml"),
                    workdir / "cloud.log")
    tap = Tap(addr, []).start()
    tensors = {k: v.numpy() for k, v in shared_state(build_edge_model(model)).items()}
    fingerprint = base_fingerprint(model)
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="repro-edge", protocol=mqtt.MQTTv311,
                      clean_session=False)
    try:
        cloud.start()
        System._until(lambda: tap.max_version() >= 0, 120, "the cloud's first global")
        pub.connect(addr.host, addr.port)
        pub.loop_start()
        infos = []
        for i in range(uploads):
            site = f"s{i}"
            payload = update_payload(perturbed(tensors, seed=zlib.crc32(site.encode())), site=site, seq=1,
                                     base_version=0, fingerprint=fingerprint, rank=model.lora_r,
                                     alpha=float(model.lora_alpha), modalities={"imu": 32, "env": 32})
            infos.append(pub.publish(topics.adapter_up(site), payload, qos=1))
        for info in infos:
            info.wait_for_publish(30)
        acked = sum(info.is_published() for info in infos)
        time.sleep(kill_after_s)
        if kill:  # (kill=False: the control, where every upload is accepted)
            cloud.kill()  # every upload is PUBACKed: an edge has confirmed and dropped them all
            cloud.start()
        time.sleep(1.0)
        System._until(lambda: tap.latest(CLOUD_ID), 120, "the restarted cloud's metrics")
        last, since = -1, time.monotonic()
        while time.monotonic() - since < 5.0:  # until the ledger stops growing
            n = int(tap.latest(CLOUD_ID).get("accepted", 0))
            if n != last:
                last, since = n, time.monotonic()
            time.sleep(0.2)
        cloud.terminate(60)
        db = sqlite3.connect(f"file:{workdir / 'cloud' / 'ledger.sqlite'}?mode=ro", uri=True)
        accepted = int(db.execute("SELECT COUNT(*) FROM updates").fetchone()[0])
        db.close()
        return {"killed": kill, "uploads": uploads, "acked_by_broker": acked, "in_ledger": accepted,
                "lost": acked - accepted, "cloud_tracebacks": cloud.tracebacks()}
    finally:
        pub.disconnect()
        pub.loop_stop()
        cloud.ensure_dead()
        tap.stop()
        broker.close()


def repro_edge_inference_loss(workdir: Path, requests: int = 200, tries: int = 4,
                              delays_s: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2)) -> dict[str, Any]:
    """Inference requests the broker acknowledged, answered by nobody after one kill -9 of the edge.

    A device sends a burst of ``requests`` inference requests; once the broker acknowledged them all, the
    edge is SIGKILLed after a short delay and restarted. Each request must get a Prediction or an
    ErrorReport. Repeated ``tries`` times with the delays in turn (the window is milliseconds wide).
    """
    broker = MosquittoBroker(state_dir=workdir / "broker", autosave_on_changes=True, autosave_interval=1).start()
    addr = BrokerAddress(broker.host, broker.port)
    cfg = edge_config(workdir / "edge", addr, {"site": "site-0", "edge_id": "edge-0", "metrics_interval_s": 0.5,
                                               "log_level": "WARNING"})
    edge = Service(cfg.edge_id, "edge_agent", cfg.write(workdir / "edge.toml"), workdir / "edge.log")
    tap = Tap(addr, [(cfg.edge_id, cfg.site)]).start()
    dev = SimDevice(0, cfg.site, addr, workdir, ToyTask(cfg.model, seed=0), rate_hz=1.0, infer_every=0)
    out: dict[str, Any] = {"requests_per_try": requests, "tries": []}
    try:
        edge.start()
        System._until(lambda: tap.latest(cfg.edge_id), 120, "the edge's metrics")
        dev.start()
        k = 0
        for t in range(tries):
            before = set(dev.requests)
            for _ in range(requests):
                rid = REQUEST_BASE + k
                k += 1
                sent = time.monotonic()
                seq = dev.client.request_inference(record(dev.name, rid, dev.task.sample(), label=False))
                with dev._lock:
                    dev.requests[rid] = (seq, sent)
            assert dev.client.flush(30), "requests not acknowledged by the broker"
            time.sleep(delays_s[t % len(delays_s)])
            mark = time.monotonic()
            edge.kill()
            edge.start()
            System._until(lambda m=mark: tap.back_after(cfg.edge_id, m) is not None, 120, "the restarted edge")
            deadline = time.monotonic() + 15.0
            while time.monotonic() < deadline and set(dev.outstanding()) & (set(dev.requests) - before):
                time.sleep(0.2)
            lost = sorted(set(dev.outstanding()) & (set(dev.requests) - before))
            out["tries"].append({"delay_s": delays_s[t % len(delays_s)], "unanswered": len(lost),
                                 "sample": lost[:10]})
        out["unanswered_total"] = sum(x["unanswered"] for x in out["tries"])
        return out
    finally:
        dev.close()
        edge.ensure_dead()
        tap.stop()
        broker.close()


def repro_reconnect_duplicate(workdir: Path) -> dict[str, Any]:
    """A record taken twice after a device reconnect (what the broker-kill phase found: ``records_duplicated``).

    Network-free, on the edge's core, with exactly the envelopes a DeviceClient sends: it registers (seq 1)
    and publishes records (seq 2, 3, 4); the broker is killed before the PUBACK of seq 4 reached the device
    though the edge already had it. On reconnect the SDK re-publishes its registration (the same envelope,
    seq 1; ``DeviceClient._process_events``, "connected") and then re-sends seq 4. The edge must drop the
    second seq 4: it is the same record.
    """
    from broker.wire import encode_envelope
    from edge_agent.checkpoints import build_trainer
    from edge_agent.core import EdgeCore

    config = edge_config(workdir / "state", BrokerAddress("127.0.0.1", 1), {"training": {"min_new_samples": 1000}})
    core = EdgeCore(config, trainer=build_trainer(config))
    task, dev = ToyTask(config.model, seed=0), "gw-1"
    reg = encode_envelope(Kind.REGISTER, dev, 1, toy_profile(dev).to_body())
    feats = {seq: encode_envelope(Kind.FEATURES, dev, seq, record(dev, seq - 2, numbered(task, seq - 2)).to_body())
             for seq in (2, 3, 4)}
    reg_topic = topics.device_up(config.site, dev, topics.Uplink.REGISTER)
    feat_topic = topics.device_up(config.site, dev, topics.Uplink.FEATURES)
    core.ingest(reg_topic, reg)
    for seq in (2, 3, 4):
        core.ingest(feat_topic, feats[seq])
    core.ingest(reg_topic, reg)  # the reconnect's registration: live (not retained), same seq 1
    core.ingest(feat_topic, feats[4])  # the resend of the record whose PUBACK was lost
    numbers = sorted(int(np.asarray(s.modalities["env"]).ravel()[0])
                     for s in core.trainer.buffer._items.values())  # the record numbers buffered
    return {"records_sent": 3, "in_buffer": len(core.trainer.buffer), "numbers": numbers,
            "lost": 0, "duplicated": len(core.trainer.buffer) - 3}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=10, help="SIGKILLs per fault kind")
    ap.add_argument("--faults", default=",".join(FAULTS), help="comma-separated: " + ", ".join(FAULTS))
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--edges", type=int, default=2)
    ap.add_argument("--devices-per-edge", type=int, default=1)
    ap.add_argument("--rate", type=float, default=20.0, help="records per second per device")
    ap.add_argument("--infer-every", type=int, default=5, help="an inference request every N records")
    ap.add_argument("--gap", default="3,8", help="seconds between kills: min,max")
    ap.add_argument("--answer-timeout", type=float, default=30.0)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "system_kill.json")
    ap.add_argument("--repro", choices=("cloud-upload-loss", "edge-inference-loss", "reconnect-duplicate"),
                    help="run one minimal reproduction instead, print its JSON (nothing written)")
    a = ap.parse_args(argv)
    if a.repro:
        fn = {"cloud-upload-loss": repro_cloud_upload_loss, "edge-inference-loss": repro_edge_inference_loss,
              "reconnect-duplicate": repro_reconnect_duplicate}[a.repro]
        with tempfile.TemporaryDirectory(prefix="megace-repro-") as tmp:
            got = fn(Path(tmp))
        print(json.dumps(got, indent=2))
        return 1 if got.get("lost") or got.get("unanswered_total") or got.get("duplicated") else 0
    gap = tuple(float(x) for x in a.gap.split(","))
    doc: dict[str, Any] = {
        "bench": "system_kill",
        "command": "python -m tests.reliability.system_kill " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "broker": "Mosquitto, autosave_on_changes true, autosave_interval 1 (deploy/mosquitto/durability.conf)",
        "settings": {"edges": a.edges, "devices_per_edge": a.devices_per_edge, "rate_hz": a.rate,
                     "infer_every": a.infer_every, "gap_s": gap, "answer_timeout_s": a.answer_timeout},
        "phases": {},
    }
    for i, kind in enumerate(a.faults.split(",")):
        with tempfile.TemporaryDirectory(prefix=f"megace-system-kill-{kind}-") as tmp:
            r = run_phase([kind] * a.kills, workdir=Path(tmp), seed=a.seed + i, edges=a.edges,
                          devices_per_edge=a.devices_per_edge, rate_hz=a.rate, infer_every=a.infer_every,
                          gap_s=gap, answer_timeout=a.answer_timeout, fault=kind)  # type: ignore[arg-type]
        doc["phases"][kind] = asdict(r)
        print(summary(r), flush=True)
    doc["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
