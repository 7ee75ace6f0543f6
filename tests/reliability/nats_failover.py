"""kill -9 of one node of a three-node NATS cluster under a running system: clients fail over, nothing is lost.

The system of ``system_kill.py`` (real ``python -m edge_agent`` / ``python -m cloud_aggregator`` processes,
real :class:`DeviceClient` devices streaming numbered records and asking for predictions, the same
read-back of durable state), on a NATS cluster started from the committed ``deploy/nats/cluster-node.conf``
(ports substituted through its ``NATS_*`` variables) instead of one Mosquitto. Every client gets the
cluster as a host list (``mqtt://n0,n1,n2``) rotated so that it starts on its *home* node:

* node 0: edge-0, dev-1;  node 1: edge-1, dev-0;  node 2: the cloud and the observing tap.

A schedule of node indexes is run: each entry SIGKILLs that node (while its clients stream), waits,
restarts it; the clients on it move to the next node of their list. Figures per kill: seconds until
every device that was on the node is online again and every service on it publishes metrics again.

    python -m tests.reliability.nats_failover [--schedule 0,1,2] [--out bench/results/nats_failover.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from broker.address import BrokerAddress
from broker.runners.nats import NatsCluster
from cloud_aggregator.config import load_cloud_config, write_cloud_config
from edge_agent.training.toy_task import ToyTask
from tests.reliability.system_kill import CLOUD_ID, RECORD_SPACE, PhaseResult, Service, SimDevice, System, Tap
from tests.support.edge_testkit import edge_config

REPO = Path(__file__).resolve().parents[2]
NODE_CONFIG = REPO / "deploy" / "nats" / "cluster-node.conf"
HOME = {"edge-0": 0, "dev-1": 0, "edge-1": 1, "dev-0": 1, CLOUD_ID: 2, "tap": 2}


def cluster_address(cluster: NatsCluster, home: int) -> BrokerAddress:
    """The cluster as one address whose first node is ``home`` (the others follow in ring order)."""
    nodes = cluster.addresses
    order = [nodes[(home + k) % len(nodes)] for k in range(len(nodes))]
    # timeout: the first SUBSCRIBE of an edge's persistent session makes ~36 replicated JetStream consumers
    return BrokerAddress.from_url("mqtt://" + ",".join(f"{h}:{p}" for h, p in order) + "?timeout=60")


class FailoverTap(Tap):
    """The system tap, moving to the cluster's next node when its connection drops (paho alone retries one host)."""

    def __init__(self, addr: BrokerAddress, edges: list[tuple[str, str]]) -> None:
        super().__init__(addr, edges)
        self._next = 0
        self.client.on_disconnect = self._on_disconnect

    def _on_disconnect(self, client: mqtt.Client, *_: Any) -> None:
        self._next += 1
        node = self.addr.endpoint(self._next)
        client.connect_async(node.host, node.port)  # paho's loop retries on the host set last


@dataclass
class NodeKill:
    """One SIGKILL of a node: who was on it, how long until each was connected (and serving) again."""

    node: int
    clients: list[str]
    at_s: float
    down_s: float
    # client -> connected to another node (a device: and CONNACKed, it is online again)
    reconnected_s: dict[str, float | None] = field(default_factory=dict)
    moved_to: dict[str, int | None] = field(default_factory=dict)
    services_back_s: dict[str, float | None] = field(default_factory=dict)  # service -> metrics again
    # clients on *other* nodes that were disconnected too and came back elsewhere (NATS dropped them when a
    # JetStream request of theirs timed out while the dead node's streams elected new leaders)
    collateral: dict[str, int] = field(default_factory=dict)
    healthy_again_s: float | None = None  # until the restarted node caught up (every node's /healthz ok)

    @property
    def recovered_s(self) -> float | None:
        """Until the last client on the node was connected elsewhere and every service on it served again."""
        parts = [*self.reconnected_s.values(), *self.services_back_s.values()]
        return None if None in parts else round(max((p for p in parts if p is not None), default=0.0), 3)


DELIVERY_COUNTERS = ("acked", "receipted", "resent", "infer_resent", "infer_given_up", "infer_duplicate_answers")


@dataclass
class FailoverResult:
    """The system figures (``PhaseResult``) plus the per-kill recovery times."""

    phase: PhaseResult
    kills: list[NodeKill] = field(default_factory=list)
    #: per kill, the records each device had published at the kill and once the cluster was healthy again
    kill_marks: list[list[int]] = field(default_factory=list)
    recovered_marks: list[list[int]] = field(default_factory=list)
    #: per device, its SDK's delivery counters: acked (PUBACKs), receipted (by its edge), resent (same seq), and for
    #: inference requests infer_resent (same seq), infer_given_up, infer_duplicate_answers (dropped before the app),
    #: and the round trip (infer_rtt_ms_p50/p99, of the last 512 answered)
    delivery: dict[str, dict[str, int]] = field(default_factory=dict)

    def lost_outside_failover(self) -> list[int]:
        """Lost records published outside every window from a node's kill to the cluster's health again: what a
        broker failing over cannot explain (NATS 2.9 acknowledged QoS 1 publishes it then lost around kills).
        Reads ``lost_sample``, which is the whole list up to 50 lost records."""
        windows = list(zip(self.kill_marks, self.recovered_marks, strict=True))
        out = []
        for n in self.phase.lost_sample:
            d, i = divmod(n, RECORD_SPACE)
            if not any(start[d] <= i < end[d] for start, end in windows):
                out.append(n)
        return out

    def unanswered_outside_failover(self) -> list[dict[str, Any]]:
        """Inference requests left unanswered that were sent outside every window from a node's kill to the
        cluster's health again (a QoS 1 request the broker acknowledged and lost is the same case as a record).
        Reads ``unanswered_sample``, which is the whole list up to 20."""
        windows = [(k.at_s, math.inf if k.healthy_again_s is None else k.at_s + k.healthy_again_s) for k in self.kills]
        return [u for u in self.phase.unanswered_sample
                if not any(start <= u["sent_s"] <= end for start, end in windows)]


class ClusterSystem(System):
    """``System`` on a NATS cluster: same services, devices and read-back; clients spread over the nodes."""

    def __init__(self, workdir: Path, *, edges: int = 2, rate_hz: float, infer_every: int, seed: int,
                 config_file: Path = NODE_CONFIG) -> None:
        self.workdir = workdir
        self.rng = random.Random(seed)
        self.broker = NatsCluster(3, config_file=config_file, state_dir=workdir / "nats")  # type: ignore[assignment]
        self.cluster = self.broker
        self.addr = cluster_address(self.cluster, HOME["tap"])
        self.edge_cfgs, self.edges = [], []
        for e in range(edges):
            home = cluster_address(self.cluster, HOME.get(f"edge-{e}", e % 3))
            cfg = edge_config(workdir / f"edge-{e}", home, {
                "site": f"site-{e}", "edge_id": f"edge-{e}", "metrics_interval_s": 0.5, "log_level": "WARNING",
                "broker": home.url(),
                "training": {"min_new_samples": 40, "interval_s": 3600.0, "steps": 4, "batch_size": 16,
                             "startup_grace_s": 0.3},
                "limits": {"replay_max_total": 500_000, "replay_max_per_device": 0},
            })
            self.edge_cfgs.append(cfg)
            self.edges.append(Service(cfg.edge_id, "edge_agent", cfg.write(workdir / f"edge-{e}.toml"),
                                      workdir / f"edge-{e}.log"))
        cloud = load_cloud_config(None, {
            "cloud_id": CLOUD_ID, "broker": cluster_address(self.cluster, HOME[CLOUD_ID]).url(),
            "state_dir": str(workdir / "cloud"), "model": self.edge_cfgs[0].model.to_dict(),
            "aggregation": {"strategy": "fedavg", "buffer_k": edges, "buffer_period_s": 3.0},
            "limits": {"metrics_period_s": 0.5, "torch_threads": 1},
        }, environ={})
        self.cloud_state = Path(cloud.state_dir)
        self.cloud = Service(CLOUD_ID, "cloud_aggregator", write_cloud_config(cloud, workdir / "cloud.toml"),
                             workdir / "cloud.log")
        task = ToyTask(self.edge_cfgs[0].model, seed=seed)
        self.devices = [SimDevice(e, self.edge_cfgs[e].site, cluster_address(self.cluster, HOME.get(f"dev-{e}", e % 3)),
                                  workdir, task, rate_hz=rate_hz, infer_every=infer_every) for e in range(edges)]
        self.device_edge = {dev.name: dev.index for dev in self.devices}
        self.tap = FailoverTap(self.addr, [(c.edge_id, c.site) for c in self.edge_cfgs])
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.broker_marks: list[list[int]] = []
        self.recovered_marks: list[list[int]] = []  # per kill: what each device had published once healthy again

    def _settle(self, value: Any, target: Any, quiet_s: float, timeout: float) -> None:
        """As ``System._settle``, with a longer quiet time: a session's redelivery after failover can pause."""
        super()._settle(value, target, max(quiet_s, 30.0), max(timeout, 240.0))

    def finish(self, out: PhaseResult, answer_timeout: float) -> None:
        """``System.finish`` once every record is receipted by its edge, not only acknowledged by the broker:
        NATS acknowledged records in a failover and then lost them; the devices re-send those (receipts)."""
        self.stop_streaming()
        for dev in self.devices:
            if not dev.client.wait_delivered(180):
                raise AssertionError(f"{dev.name}: {dev.client.unreceipted} records never receipted by its edge")
        super().finish(out, answer_timeout)

    def who(self, client_id: str) -> str | None:
        """The system's name of an MQTT client id (``megace-edge-edge-0`` -> ``edge-0``, ``megace-dev-site-1-dev-1``
        -> ``dev-1``: a device's id names its site first); None: not ours."""
        for prefix in ("megace-dev-", "megace-edge-", "megace-cloud-"):
            if client_id.startswith(prefix):
                name = client_id[len(prefix):]
                if prefix == "megace-dev-":
                    site = next((c.site for c in self.edge_cfgs if name.startswith(c.site + "-")), None)
                    return None if site is None else name[len(site) + 1:]
                return name
        return None

    def placement(self) -> dict[str, int]:
        """Which live node each edge, device and the cloud is connected to now (NATS's ``/connz``)."""
        out: dict[str, int] = {}
        for i, node in enumerate(self.cluster.nodes):
            if node.running:
                with contextlib.suppress(OSError):  # a node restarting has no monitoring port yet
                    out.update({name: i for c in node.mqtt_clients() if (name := self.who(c))})
        return out

    def node_of(self, target: int | str, timeout: float = 60.0) -> int:
        """``target`` itself if a node index, else the node the client named ``target`` is connected to now.

        NATS moves clients around on its own (it drops one whose JetStream request timed out during another
        node's elections), so a fixed node index may hold none of them by the time it is killed."""
        if isinstance(target, int):
            return target
        deadline = time.monotonic() + timeout
        while (node := self.placement().get(target)) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"{target} is connected to no node")
            time.sleep(0.1)
        return node

    def kill_node(self, target: int | str, down_s: float, timeout: float = 90.0,
                  healthy_timeout_s: float = 60.0) -> NodeKill:
        """SIGKILL ``target``'s node while its clients stream; time their return elsewhere; a timer restarts it.

        Then wait up to ``healthy_timeout_s`` for every node's ``/healthz``: NATS 2.9.10 under load often reports a
        restarted node behind for longer than a minute (``healthy_again_s`` None in the figures) while MQTT on it
        already works, so the suite waits less than the benchmark does."""
        node = self.node_of(target)
        before = self.placement()
        on_it = sorted(c for c, n in before.items() if n == node)
        online = {d.name: d.client for d in self.devices}
        services = [c for c in on_it if not c.startswith("dev-")]
        self.broker_marks.append([d.published for d in self.devices])
        t0 = time.monotonic()
        self.cluster.kill(node)
        restart = threading.Timer(down_s, self.cluster.restart, args=(node,))
        restart.start()
        out = NodeKill(node=node, clients=on_it, at_s=round(t0 - self.t0, 2), down_s=down_s)
        out.reconnected_s = dict.fromkeys(on_it)
        out.moved_to = dict.fromkeys(on_it)
        deadline = t0 + timeout
        while time.monotonic() < deadline and None in out.reconnected_s.values():
            now = self.placement()
            for c in on_it:
                if out.reconnected_s[c] is None and now.get(c, node) != node and (c not in online or online[c].online):
                    out.reconnected_s[c] = round(time.monotonic() - t0, 3)
                    out.moved_to[c] = now[c]
            time.sleep(0.05)
        while time.monotonic() < deadline and any(self.tap.back_after(s, t0) is None for s in services):
            time.sleep(0.05)
        out.services_back_s = {s: (None if (b := self.tap.back_after(s, t0)) is None else round(b, 3))
                               for s in services}
        restart.join()
        with contextlib.suppress(TimeoutError):  # None in the figures: it never caught up
            out.healthy_again_s = round(down_s + self.cluster.wait_healthy(healthy_timeout_s), 3)
        self.recovered_marks.append([d.published for d in self.devices])
        after = self.placement()
        out.collateral = {c: n for c, n in after.items() if c in before and c not in on_it and before[c] != n}
        return out


def run_failover(schedule: list[int | str], *, workdir: Path, seed: int = 0, rate_hz: float = 20.0,
                 infer_every: int = 5, warmup_s: float = 4.0, gap_s: float = 4.0, down_s: float = 3.0,
                 answer_timeout: float = 30.0, config_file: Path = NODE_CONFIG,
                 healthy_timeout_s: float = 60.0) -> FailoverResult:
    """Start the system on a fresh cluster, kill the ``schedule``'s nodes one after another, stop, count.

    An entry is a node index, or a client's name (``edge-0``, ``dev-1``, ``cloud-kill``): its node then."""
    phase = PhaseResult(fault="nats-node", schedule=[f"node-{n}" if isinstance(n, int) else f"node-of-{n}"
                                                     for n in schedule], seed=seed, edges=2, devices=2,
                        loadavg_at_start=[round(x, 2) for x in os.getloadavg()])
    phase.kills = dict(Counter(phase.schedule))
    result = FailoverResult(phase=phase)
    system = ClusterSystem(workdir, rate_hz=rate_hz, infer_every=infer_every, seed=seed, config_file=config_file)
    started = time.monotonic()
    try:
        system.start()
        system.t0 = time.monotonic()
        time.sleep(warmup_s)
        for target in schedule:
            result.kills.append(system.kill_node(target, down_s, healthy_timeout_s=healthy_timeout_s))
            time.sleep(gap_s)
        system.finish(phase, answer_timeout)
        result.delivery = {d.name: {k: int(d.client.counters[k]) for k in DELIVERY_COUNTERS} for d in system.devices}
        for d in system.devices:  # request to first answer at the device: what infer_retry_s is weighed against
            rtt = d.client.metrics.snapshot()["rtt_ms"]
            result.delivery[d.name].update({f"infer_rtt_ms_{q}": round(rtt[q] or 0) for q in ("p50", "p99")})
        phase.recovery_s = [k.recovered_s for k in result.kills]
        result.kill_marks, result.recovered_marks = system.broker_marks, system.recovered_marks
    finally:
        system.close()
        phase.seconds = round(time.monotonic() - started, 1)
        phase.loadavg_at_end = [round(x, 2) for x in os.getloadavg()]
    return result


def summary(r: FailoverResult) -> str:
    p = r.phase
    kills = ", ".join(f"node {k.node} ({'+'.join(k.clients)}) back in {k.recovered_s} s" for k in r.kills)
    return (f"{kills}; records acked {p.records_acked} lost {p.records_lost} dup {p.records_duplicated}; uploads "
            f"{p.uploads_accepted} twice {p.uploads_accepted_twice} applied twice {p.uploads_applied_twice}; versions "
            f"{p.versions_committed} forked {p.versions_forked}; predictions {p.predictions_requested} unanswered "
            f"{p.predictions_unanswered}; delivery {r.delivery}; {p.seconds} s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--schedule", default=f"edge-0,dev-0,{CLOUD_ID}",
                    help="nodes to SIGKILL in turn: an index (at the start 0: edge-0+dev-1, 1: edge-1+dev-0, 2: the "
                    "cloud) or a client's name (the node it is on when its turn comes)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rate", type=float, default=20.0, help="records per second per device")
    ap.add_argument("--gap", type=float, default=5.0, help="seconds between a restart and the next kill")
    ap.add_argument("--down", type=float, default=3.0, help="seconds a killed node stays dead")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "nats_failover.json")
    a = ap.parse_args(argv)
    schedule: list[int | str] = [int(x) if x.isdigit() else x for x in a.schedule.split(",")]
    with tempfile.TemporaryDirectory(prefix="megace-nats-failover-") as tmp:
        r = run_failover(schedule, workdir=Path(tmp), seed=a.seed, rate_hz=a.rate, gap_s=a.gap, down_s=a.down)
    print(summary(r), flush=True)
    p = r.phase
    doc = {
        "bench": "nats_failover",
        "command": "python -m tests.reliability.nats_failover " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
        "broker": "nats-server 2.9.10, 3 nodes, JetStream + MQTT, deploy/nats/cluster-node.conf",
        "topology": {"node-0": ["edge-0", "dev-1"], "node-1": ["edge-1", "dev-0"], "node-2": [CLOUD_ID, "tap"]},
        "settings": {"schedule": schedule, "rate_hz": a.rate, "gap_s": a.gap, "down_s": a.down},
        "kills": [asdict(k) | {"recovered_s": k.recovered_s} for k in r.kills],
        "time_to_recover_s_max": max((k.recovered_s for k in r.kills if k.recovered_s is not None), default=None),
        "records_acked": p.records_acked, "records_lost": p.records_lost, "records_duplicated": p.records_duplicated,
        "uploads_accepted": p.uploads_accepted, "uploads_accepted_twice": p.uploads_accepted_twice,
        "versions_applied_twice": p.uploads_applied_twice, "versions_committed": p.versions_committed,
        "versions_forked": p.versions_forked, "predictions_requested": p.predictions_requested,
        "predictions_unanswered": p.predictions_unanswered, "delivery": r.delivery, "phase": asdict(p),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
