"""End to end on a real Mosquitto: three edge processes of different ranks and modality sets,
one of them slow (uploading on an old base version), and the cloud aggregator service."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from broker import topics
from broker.address import BrokerAddress
from broker.topics import Role
from broker.wire import GlobalAdapter, decode_metrics
from broker.wire.bodies import decode_body
from cloud_aggregator.ledger import Ledger
from cloud_aggregator.service import running
from megace_model.adapters import build_edge_model, shared_state
from tests.support.cloud_bus import MAX_RANK, cloud_config, eventually, model_config
from tests.support.collector import Collector

ROOT = Path(__file__).resolve().parents[2]
EDGES = {
    # site: rank, modality sample counts, rounds, slow (waits for this global version, keeps base 0)
    "a": {"rank": 8, "modalities": {"audio": 30, "image": 30}, "rounds": 3},
    "b": {"rank": 4, "modalities": {"audio": 0, "image": 40}, "rounds": 3},
    "c": {"rank": 2, "modalities": {"audio": 20, "image": 0}, "rounds": 2, "wait_version": 3},
}


async def test_three_heterogeneous_edges_and_a_slow_one(tmp_path: Path, fresh_mosquitto):
    addr = BrokerAddress(fresh_mosquitto.host, fresh_mosquitto.port)
    cfg = cloud_config(
        tmp_path / "cloud",
        addr,
        aggregation={
            "strategy": "modality-aware",
            "strategy_options": {"inner": "fedavg"},
            "buffer_k": 2,
            "buffer_period_s": 1.0,
            "discount": "polynomial",
            "discount_options": {"a": 0.5},
        },
        limits={"max_packet_bytes": 16 * 1024, "metrics_period_s": 0.5},
    )
    metrics_topic = topics.metrics(Role.CLOUD, cfg.cloud_id)
    with Collector(addr, *topics.subscriptions(topics.global_down()), metrics_topic) as col:
        async with running(cfg) as agg:
            procs = {}
            for site, spec in EDGES.items():
                args = {
                    "host": addr.host, "port": addr.port, "site": site, "samples": 32, "max_packet": 8 * 1024,
                    "ready": str(tmp_path / f"{site}.ready"), "go": str(tmp_path / "go"),
                    "result": str(tmp_path / f"{site}.json"), **spec,
                }
                procs[site] = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "tests.support.sim_edge", json.dumps(args), cwd=ROOT,
                    stderr=open(tmp_path / f"{site}.err", "wb"),  # noqa: SIM115 (closed with the process)
                )
            # start the rounds together, once every edge has its model and the retained v0
            await eventually(lambda: all((tmp_path / f"{s}.ready").exists() for s in EDGES), 120, what="edges ready")
            (tmp_path / "go").touch()
            for site, p in procs.items():
                rc = await asyncio.wait_for(p.wait(), 120)
                assert rc == 0, f"edge {site} failed:\n{(tmp_path / f'{site}.err').read_text()[-3000:]}"
            core = agg.core
            assert core is not None
            final_version = core.version
            reassembled = core.inbox.reassembler.completed

        def final_metrics() -> dict | None:
            docs = [decode_metrics(p)["metrics"] for t, p, _ in col.raw if t == metrics_topic]
            return docs[-1] if docs and docs[-1]["accepted"] == 8 and docs[-1]["pending"] == 0 else None

        await eventually(final_metrics, 10, what="final metrics")
        reports = {s: json.loads((tmp_path / f"{s}.json").read_text()) for s in EDGES}
        metric_docs = [decode_metrics(p) for t, p, _ in col.raw if t == metrics_topic]
        globals_seen = [decode_body(e) for t, e in col.envelopes if t == topics.global_down()]

    # successive versions, each broadcast once, starting from the retained seeded v0
    versions = [g.version for g in globals_seen]
    assert versions == list(range(final_version + 1)), versions
    assert final_version >= 4  # 8 uploads in batches of at most 2
    v0 = globals_seen[0]
    assert isinstance(v0, GlobalAdapter) and v0.rank == MAX_RANK
    seeded = shared_state(build_edge_model(model_config(MAX_RANK)))
    for name, t in seeded.items():
        expected = np.zeros_like(t.numpy()) if ".lora_B." in name else t.numpy()
        np.testing.assert_allclose(v0.tensors[name], expected, atol=1e-7)
    assert reassembled >= 8, "uploads were published chunked and reassembled by the cloud"

    # every edge applied a view of its own rank after each upload (checked inside the process)
    for site, spec in EDGES.items():
        rep = reports[site]
        assert len(rep["applied"]) == spec["rounds"], rep
        applied = [a["version"] for a in rep["applied"]]
        assert applied == sorted(applied) and applied[0] >= 1
    # modality-aware views: b lacks audio, c lacks image, so they get fewer tensors than a
    n_tensors = {s: reports[s]["applied"][-1]["tensors"] for s in EDGES}
    assert n_tensors["a"] == 12 and n_tensors["b"] == 10 and n_tensors["c"] == 10, n_tensors

    # the slow edge's updates were built on v0 and arrived >= 3 versions late: discounted
    for st in reports["c"]["stats"]:
        assert st["staleness"] >= 3
        assert st["discount"] == pytest.approx((1 + st["staleness"]) ** -0.5)
        # its coefficient in the FedBuff step is at most its discount, even when alone in a batch
        assert st["discount"] < 1.0 and 0.0 < st["weight"] <= st["discount"] + 1e-9
        assert st["drift"] >= 0.0
    fresh = [st for s in "ab" for st in reports[s]["stats"]]
    assert min(st["discount"] for st in fresh) > max(st["discount"] for st in reports["c"]["stats"])

    # durable record: all 8 uploads accepted, each applied in exactly one version, nothing pending
    with Ledger(cfg.state_dir) as ledger:
        assert ledger.pending_count() == 0
        applied = [u for v in range(1, final_version + 1) for u in ledger.applied_in(v)]
        expected = {(f"edge-{s}", q) for s, spec in EDGES.items() for q in range(1, spec["rounds"] + 1)}
        assert sorted(applied) == sorted(expected)
        assert ledger.latest_version() == final_version

    last = metric_docs[-1]["metrics"]
    assert last["version"] == final_version and last["accepted"] == 8 and last["rejected"] == 0
    assert last["bytes_in"] > 0 and last["bytes_out"] > 0 and last["pending"] == 0
    assert max(d["metrics"]["staleness"]["max"] for d in metric_docs) >= 2
    assert any(d["metrics"]["aggregation_ms"] > 0 for d in metric_docs)
