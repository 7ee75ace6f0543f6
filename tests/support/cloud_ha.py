"""Cloud failover, end to end: replicas on one PostgreSQL ledger, edges uploading, the leader killed with SIGKILL.

Shared by ``tests/cloud/test_cloud_ha.py`` (which asserts) and ``bench/bench_cloud_failover.py`` (which records).
Every replica is a real ``python -m cloud_aggregator --config FILE --ledger URL`` process with its own state
directory; the edges upload real tiny-model adapters and resend each one every 2 s until a site feedback lists
it as accepted (at-least-once), like ``test_cloud_service_crash``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psycopg

from broker import topics
from broker.address import BrokerAddress
from broker.aio import make_client, publish
from broker.dedup import SequenceGuard
from broker.topics import Role
from broker.wire import GlobalAdapter, SiteFeedback, decode_metrics
from broker.wire.bodies import decode_body
from cloud_aggregator.config import write_cloud_config
from megace_model.adapters import build_edge_model, shared_state
from megace_model.fingerprint import base_fingerprint
from tests.support.cloud_bus import cloud_config, eventually, model_config, perturbed, update_payload
from tests.support.collector import Collector

RANK = 4
SAMPLES = 32
Sent = dict[tuple[str, int], tuple[int, dict[str, np.ndarray]]]


@dataclass
class FailoverRun:
    """What one run saw; the test asserts on it, the bench records it."""

    replicas: int
    sites: list[str]
    rounds: int
    killed_pid: int = 0
    new_leader_pid: int = 0
    killed_at_version: int = -1
    #: uploads acknowledged when the leader was killed (fewer than all: the kill lands mid-stream)
    acked_at_kill: int = 0
    #: SIGKILL → the lease row names another replica
    takeover_s: float = 0.0
    #: SIGKILL → the first global published by the new leader (the loop is served again)
    recover_s: float = 0.0
    sent: Sent = field(default_factory=dict)
    #: (edge, seq) the edges saw acknowledged (a site feedback listed the seq)
    acked: set[tuple[str, int]] = field(default_factory=set)
    resends: int = 0
    #: versions whose first global an edge would drop as a replay (its envelope seq not above the last one seen:
    #: a new leader reusing the old one's seqs)
    dropped_versions: list[int] = field(default_factory=list)
    #: version → distinct digests of the tensors published for it (more than one = a fork)
    published: dict[int, set[str]] = field(default_factory=dict)
    retained_version: int = -1
    exit_codes: list[int] = field(default_factory=list)
    logs: dict[int, str] = field(default_factory=dict)
    #: pid → how many MQTT sessions it started ("online at" log lines)
    sessions: dict[int, int] = field(default_factory=dict)


def digest(g: GlobalAdapter) -> str:
    h = hashlib.sha256()
    for name in sorted(g.tensors):
        a = np.ascontiguousarray(g.tensors[name])
        h.update(name.encode() + str(a.dtype).encode() + str(a.shape).encode() + a.tobytes())
    return h.hexdigest()


class Bus:
    """What the edges see: globals and per-site feedback, decoded by the collector's thread."""

    def __init__(self, col: Collector) -> None:
        self.col = col

    def bodies(self, start: int = 0) -> list[Any]:
        return [decode_body(e) for _, e in self.col.envelopes[start:]]

    def version(self) -> int:
        return max((b.version for b in self.bodies() if isinstance(b, GlobalAdapter)), default=-1)

    def acked(self, site: str, seq: int) -> bool:
        return any(isinstance(b, SiteFeedback) and b.site == site and seq in b.accepted for b in self.bodies())


async def edge(site: str, addr: BrokerAddress, bus: Bus, tensors: dict[str, Any], fingerprint: str,
               run: FailoverRun) -> None:
    """Upload ``run.rounds`` updates, each resent every 2 s until acknowledged."""
    async with make_client(addr, identifier=f"ha-edge-{site}") as client:
        for seq in range(1, run.rounds + 1):
            base, update = max(bus.version(), 0), perturbed(tensors, seed=zlib.crc32(f"{site}/{seq}".encode()))
            run.sent[(f"edge-{site}", seq)] = (base, update)
            payload = update_payload(update, site=site, seq=seq, base_version=base, fingerprint=fingerprint,
                                     rank=RANK, samples=SAMPLES)
            first = True
            while not bus.acked(site, seq):
                if not first:
                    run.resends += 1
                first = False
                await publish(client, topics.adapter_up(site), payload, sender=f"edge-{site}", seq=seq)
                for _ in range(40):
                    if bus.acked(site, seq):
                        break
                    await asyncio.sleep(0.05)
            run.acked.add((f"edge-{site}", seq))
            await asyncio.sleep(0.15)


def lease(url: str) -> tuple[int, int] | None:
    """``(epoch, pid)`` of the lease holder, or None before the first."""
    with psycopg.connect(url, autocommit=True) as db:
        try:
            row = db.execute("SELECT epoch, holder FROM lease WHERE name='cloud'").fetchone()
        except psycopg.errors.UndefinedTable:
            return None
    if row is None or not row[1]:
        return None
    return int(row[0]), int(str(row[1]).rsplit(":", 1)[1])


async def start_replica(cfg_path: Path, url: str, log: Path) -> asyncio.subprocess.Process:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cloud_aggregator", "--config", str(cfg_path), "--ledger", url,
        stderr=open(log, "ab"), env=env,
    )


async def run_failover(tmp: Path, addr: BrokerAddress, url: str, *, replicas: int = 3, sites: int = 4,
                       rounds: int = 6, kill_at: int = 2) -> FailoverRun:
    """Start ``replicas``, let the edges upload, SIGKILL the leader once version ``kill_at`` is out, finish."""
    run = FailoverRun(replicas=replicas, sites=[f"s{i}" for i in range(sites)], rounds=rounds)
    procs: dict[int, asyncio.subprocess.Process] = {}
    logs: dict[int, Path] = {}
    cfg = None
    for i in range(replicas):
        cfg = cloud_config(
            tmp / f"replica{i}", addr,
            aggregation={"strategy": "fedavg", "buffer_k": 3, "buffer_period_s": 0.5, "max_share": 1.0},
            limits={"metrics_period_s": 0.5},
            ledger={"poll_s": 0.2, "heartbeat_s": 0.5},
        )
        cfg_path = write_cloud_config(cfg, tmp / f"replica{i}.toml")
        log = tmp / f"replica{i}.log"
        proc = await start_replica(cfg_path, url, log)
        procs[proc.pid] = proc
        logs[proc.pid] = log
    assert cfg is not None
    tensors = shared_state(build_edge_model(model_config(RANK)))
    fingerprint = base_fingerprint(model_config(RANK))
    filters = [
        *topics.subscriptions(topics.global_down()),
        *(f for s in run.sites for f in topics.subscriptions(topics.site_feedback(s))),
        topics.metrics(Role.CLOUD, cfg.cloud_id),
    ]
    try:
        with Collector(addr, *filters) as col:
            bus = Bus(col)
            await eventually(lambda: bus.version() >= 0, 180, what="v0 from the first leader")
            edges = [asyncio.create_task(edge(s, addr, bus, tensors, fingerprint, run)) for s in run.sites]
            await eventually(lambda: bus.version() >= kill_at, 120, what=f"version {kill_at}")
            epoch, leader = lease(url) or (0, 0)
            run.killed_pid, run.killed_at_version, run.acked_at_kill = leader, bus.version(), len(run.acked)
            # the new leader's envelopes start above the old leader's reserved seq block (messages.SeqReserve)
            old_limit = _reserved(url)
            t_kill = time.monotonic()
            procs[leader].send_signal(signal.SIGKILL)  # mid-stream: the edges keep uploading into the broker
            await procs[leader].wait()
            held = await eventually(lambda: (lambda h: h if h and h[0] > epoch else None)(lease(url)), 60,
                                    interval=0.02, what="a standby taking the lease")
            run.takeover_s = time.monotonic() - t_kill
            run.new_leader_pid = held[1]
            await eventually(lambda: any(e.seq > old_limit and isinstance(decode_body(e), GlobalAdapter)
                                         for _, e in list(col.envelopes)), 60,
                             interval=0.02, what="the new leader's global")
            run.recover_s = time.monotonic() - t_kill
            await asyncio.wait_for(asyncio.gather(*edges), 180)
            total = len(run.sites) * rounds
            await eventually(lambda: _settled(col, cfg.cloud_id, total), 60, what="all accepted and aggregated")
            guard = SequenceGuard()  # what every edge applies to the cloud's envelopes
            for _, env in list(col.envelopes):
                b = decode_body(env)
                fresh = guard.accept(env.sender, env.seq)
                if isinstance(b, GlobalAdapter):
                    if b.version not in run.published and not fresh:
                        run.dropped_versions.append(b.version)
                    run.published.setdefault(b.version, set()).add(digest(b))
        with Collector(addr, *topics.subscriptions(topics.global_down())) as late:  # a subscriber arriving now
            got = await eventually(lambda: [decode_body(e) for _, e in late.envelopes], 30, what="retained global")
            run.retained_version = got[-1].version
    finally:
        for proc in procs.values():
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for pid, proc in procs.items():
            try:
                run.exit_codes.append(await asyncio.wait_for(proc.wait(), 60))
            except TimeoutError:
                proc.kill()
                run.exit_codes.append(await proc.wait())
            run.logs[pid] = logs[pid].read_text(errors="replace")
            run.sessions[pid] = run.logs[pid].count(" online at ")
    return run


def _reserved(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as db:
        row = db.execute("SELECT body FROM docs WHERE name='outseq.json'").fetchone()
    return int(json.loads(bytes(row[0]))["reserved"])


def _settled(col: Collector, cloud_id: str, accepted: int) -> bool:
    topic = topics.metrics(Role.CLOUD, cloud_id)
    docs = [decode_metrics(p)["metrics"] for t, p, _ in col.raw if t == topic]
    return bool(docs) and docs[-1]["accepted"] == accepted and docs[-1]["pending"] == 0
