"""Adapter bytes through the broker per aggregation round, before and after view cuts, side by side.

Drives the real ``AggregatorCore`` and N real ``EdgeCore`` s (tiny trainers on the toy model, LoRA ranks cycling
8/4/2, or all 8, with alpha = 2r, so the cloud's global is rank 8) in-process: every message the cloud publishes
is handed to its subscribers the way the broker delivers it, and every install goes through ``EdgeCore.apply``.
Each round every edge uploads a moved copy of the adapter it holds (buffer_k = N: the last upload aggregates).

Counted the publish/subscribe way: a publish counts once in, each delivery once out, so an upload is 2 copies,
the retained global 1 + N (every edge subscribes to it) and a site feedback 2. Metrics and status are not
adapter traffic and are left out. Two figures per round: adapter (tensor) bytes, and whole message bytes
(envelope and msgpack framing included); each also as a ratio over one full-rank adapter (the global's tensor
bytes, resp. the global message's size), next to the issue's goal of 3N+1.

``before`` is ``aggregation.feedback_tensors = "always"``: every feedback carries the site's whole view, the
acknowledgement of each upload included (the traffic before view cuts). ``after`` is the default ("needed").
Both runs start from the same seeds; the bench checks that every edge ends every round at the cloud's version
with bit-identical adapters in both runs (``edges_identical``). Scenarios (``strategy:ranks``): ``fedavg`` with
mixed ranks and with all edges at rank 8 (where the counts are exactly 7N+1 before and 3N+1 after), ``modality-aware``
(sites lacking a modality: cuts that leave modules out) and ``flora`` (stacked factors: a site's view is an SVD fit,
not a cut, so it is still sent, once per round; the unit is then flora's stacked global, rank sum of the batch).

    python bench/bench_round_bytes.py [--sizes 3 10] [--rounds 3] [--scenarios fedavg:8,4,2 ...] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker import topics
from broker.wire import AdapterUpdate, GlobalAdapter, Kind, SiteFeedback, decode_envelope, encode_envelope
from broker.wire.bodies import decode_body
from cloud_aggregator.config import load_cloud_config
from cloud_aggregator.core import AggregatorCore
from cloud_aggregator.messages import Outgoing
from edge_agent.checkpoints import build_trainer
from edge_agent.config import EdgeConfig
from edge_agent.core import EdgeCore
from edge_agent.training.toy_task import toy_config

MODALITIES = ({"env": 8, "imu": 8}, {"env": 0, "imu": 8}, {"env": 8, "imu": 0})
SCENARIOS = ("fedavg:8,4,2", "fedavg:8", "modality-aware:8,4,2", "flora:8,4,2")
MODES = {"before": "always", "after": "needed"}


class Fleet:
    """One cloud core and N edge cores; :meth:`publish` delivers a cloud message to its subscribers and counts it."""

    def __init__(self, root: Path, strategy: str, ranks: list[int], feedback_tensors: str) -> None:
        n = len(ranks)
        model = toy_config()
        self.cloud = AggregatorCore(load_cloud_config(None, {
            "cloud_id": "cloud", "state_dir": str(root / "cloud"), "broker": "mqtt://127.0.0.1:1",
            "model": model.to_dict(),
            "aggregation": {"strategy": strategy, "buffer_k": n, "feedback_tensors": feedback_tensors},
        }, environ={}))
        self.edges: list[EdgeCore] = []
        for i, r in enumerate(ranks):
            cfg = EdgeConfig.from_dict({
                "site": f"site-{i}", "edge_id": f"edge-{i}", "broker": "mqtt://127.0.0.1:1",
                "state_dir": str(root / f"edge-{i}"), "model": {**model.to_dict(), "lora_r": r, "lora_alpha": 2 * r},
                "training": {"torch_threads": 1, "device": "cpu"},
            })
            self.edges.append(EdgeCore(cfg, trainer=build_trainer(cfg)))
        self.tally: dict[str, list[int]] = {}  # kind -> [tensor bytes, message bytes], copies included
        self.received: dict[str, int] = {}  # edge -> messages carrying tensors it received this round

    def count(self, kind: str, tensor_bytes: int, message_bytes: int, copies: int) -> None:
        t = self.tally.setdefault(kind, [0, 0])
        t[0] += tensor_bytes * copies
        t[1] += message_bytes * copies

    def publish(self, o: Outgoing) -> None:
        if "/metrics/" in o.topic:
            return
        msg = decode_body(decode_envelope(o.payload))
        assert isinstance(msg, (GlobalAdapter, SiteFeedback))
        nbytes = sum(int(np.asarray(t).nbytes) for t in msg.tensors.values())
        receivers = self.edges if o.topic == topics.global_down() else [
            e for e in self.edges if o.topic == topics.site_feedback(e.site)]
        kind = "global" if isinstance(msg, GlobalAdapter) else ("feedback_with_tensors" if nbytes else "feedback")
        self.count(kind, nbytes, len(o.payload), 1 + len(receivers))
        for edge in receivers:
            if nbytes:
                self.received[edge.edge_id] = self.received.get(edge.edge_id, 0) + 1
            for job in edge.ingest(o.topic, o.payload).applies:
                edge.apply(job.source, job.version, job.tensors)

    def round(self, seq: int) -> None:
        for i, edge in enumerate(self.edges):
            assert edge.trainer is not None
            rng = np.random.default_rng(zlib.crc32(f"{edge.site}/{seq}".encode()))
            moved = {n: (t.detach().numpy() + 0.05 * rng.standard_normal(tuple(t.shape))).astype(np.float32)
                     for n, t in edge.trainer.shared_state().items()}
            update = AdapterUpdate(edge=edge.edge_id, site=edge.site, seq=seq,
                                   base_version=max(edge.state.global_version, 0), base_model=self.cloud.fingerprint,
                                   rank=edge.config.model.lora_r, alpha=float(edge.config.model.lora_alpha),
                                   samples=8, modalities=MODALITIES[i % len(MODALITIES)], tensors=moved)
            payload = encode_envelope(Kind.ADAPTER, edge.edge_id, seq, update.to_body())
            self.count("upload", sum(int(t.nbytes) for t in moved.values()), len(payload), 2)  # in, out to the cloud
            for o in self.cloud.ingest(topics.adapter_up(edge.site), payload):
                self.publish(o)

    def adapters(self) -> list[dict[str, np.ndarray]]:
        out = []
        for e in self.edges:
            assert e.trainer is not None
            out.append({n: t.detach().clone().numpy() for n, t in e.trainer.shared_state().items()})
        return out


def run(strategy: str, cycle: tuple[int, ...], n: int, rounds: int, root: Path) -> dict[str, Any]:
    ranks = [cycle[i % len(cycle)] for i in range(n)]
    name = f"{strategy}-{n}-{'-'.join(map(str, cycle))}"
    fleets = {label: Fleet(root / f"{name}-{label}", strategy, ranks, mode) for label, mode in MODES.items()}
    try:
        for fleet in fleets.values():
            for o in fleet.cloud.announce():
                fleet.publish(o)
        per_mode: dict[str, dict[str, Any]] = {label: {"rounds": []} for label in MODES}
        identical = True
        unit = unit_msg = 0
        for seq in range(1, rounds + 1):
            for label, fleet in fleets.items():
                fleet.tally, fleet.received = {}, {}
                fleet.round(seq)
                assert fleet.cloud.version == seq, (strategy, n, label, fleet.cloud.version)
                for e in fleet.edges:
                    assert e.state.global_version == seq, (strategy, n, label, e.edge_id, e.state.global_version)
                g = fleet.cloud.glob
                unit = sum(int(t.numel() * t.element_size()) for t in g.tensors.values())
                unit_msg = fleet.tally["global"][1] // (1 + n)
                per_mode[label]["rounds"].append({
                    "by_kind": {k: {"adapter_bytes": v[0], "message_bytes": v[1]} for k, v in fleet.tally.items()},
                    "adapter_bytes": sum(v[0] for v in fleet.tally.values()),
                    "message_bytes": sum(v[1] for v in fleet.tally.values()),
                    "max_adapter_messages_per_edge": max(fleet.received.values(), default=0),
                })
            a, b = (f.adapters() for f in fleets.values())
            identical &= all(np.array_equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)
        out: dict[str, Any] = {"strategy": strategy, "n": n, "ranks": ranks,
                               "adapter_bytes_full_rank": unit, "global_message_bytes": unit_msg,
                               "goal_copies": 3 * n + 1, "edges_identical": identical}
        for label in MODES:
            rs = per_mode[label]["rounds"]
            ab = sum(r["adapter_bytes"] for r in rs) / len(rs)
            mb = sum(r["message_bytes"] for r in rs) / len(rs)
            out[label] = {
                "adapter_bytes_per_round": ab, "message_bytes_per_round": mb,
                "adapter_copies_per_round": round(ab / unit, 3), "message_copies_per_round": round(mb / unit_msg, 3),
                "max_adapter_messages_per_edge_per_round": max(r["max_adapter_messages_per_edge"] for r in rs),
                "by_kind_last_round": rs[-1]["by_kind"],
            }
        out["met"] = out["after"]["adapter_copies_per_round"] <= 3 * n + 1
        out["after_over_before"] = round(out["after"]["adapter_bytes_per_round"]
                                         / out["before"]["adapter_bytes_per_round"], 3)
        return out
    finally:
        for fleet in fleets.values():
            fleet.cloud.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[3, 10])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), help="strategy:rank,rank,... (cycled)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "round_bytes.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    results = []
    with tempfile.TemporaryDirectory(prefix="megace-round-bytes-") as tmp:
        for scenario in args.scenarios:
            strategy, _, cycle = scenario.partition(":")
            for n in args.sizes:
                r = run(strategy, tuple(int(x) for x in (cycle or "8,4,2").split(",")), n, args.rounds, Path(tmp))
                results.append(r)
                before, after = r["before"], r["after"]
                print(f"{scenario:>20} N={n:<3} adapter copies/round before {before['adapter_copies_per_round']:7.2f}"
                      f"  after {after['adapter_copies_per_round']:7.2f}  goal <= {3 * n + 1}"
                      f"  (messages: {before['message_copies_per_round']:.2f} -> "
                      f"{after['message_copies_per_round']:.2f})  identical edges: {r['edges_identical']}")
    doc = {
        "bench": "round_bytes",
        "command": " ".join(["python bench/bench_round_bytes.py", *sys.argv[1:]]),
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "goal": "adapter bytes on the wire per aggregation round <= (3N+1) x adapter size",
        "counting": "publish/subscribe: a publish counts once in, each delivery once out (upload 2, global 1+N, "
                    "site feedback 2); metrics and status left out; unit = the full-rank (rank-8) adapter",
        "model": "toy (tiny backbone, modalities env+imu), alpha = 2r; edge i has modalities "
                 + json.dumps(MODALITIES) + "[i % 3] (only modality-aware reads them)",
        "rounds": args.rounds,
        "results": results,
        "met_all": all(r["met"] for r in results),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
