"""Kill -9 the aggregator process mid-stream, restart it: same version, nothing lost, nothing applied twice.

The cloud runs as ``python -m cloud_aggregator --config FILE`` (what systemd runs); four edges
upload a stream of real tiny-model adapters and resend until the cloud acknowledges them.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import zlib
from pathlib import Path

import numpy as np

from broker import topics
from broker.address import BrokerAddress
from broker.aio import make_client, publish
from broker.topics import Role
from broker.wire import GlobalAdapter, SiteFeedback, Status, decode_metrics
from broker.wire.bodies import decode_body
from cloud_aggregator.config import write_cloud_config
from cloud_aggregator.ledger import Ledger
from megace_model.adapters import build_edge_model, shared_state
from megace_model.fingerprint import base_fingerprint
from tests.support import np_reference as ref
from tests.support.cloud_bus import cloud_config, eventually, model_config, perturbed, update_payload
from tests.support.collector import Collector

SITES = [f"s{i}" for i in range(4)]
ROUNDS = 6
RANK = 4


class Bus:
    """What the edges see: globals and per-site feedback, decoded by the collector thread."""

    def __init__(self, col: Collector) -> None:
        self.col = col

    def bodies(self, start: int = 0) -> list[object]:
        return [decode_body(e) for _, e in self.col.envelopes[start:]]

    def version(self) -> int:
        vs = [b.version for b in self.bodies() if isinstance(b, GlobalAdapter)]
        return max(vs, default=-1)

    def acked(self, site: str, seq: int) -> bool:
        return any(isinstance(b, SiteFeedback) and b.site == site and seq in b.accepted for b in self.bodies())


SAMPLES = 32


async def edge(site: str, addr: BrokerAddress, bus: Bus, tensors: dict, fingerprint: str,
               sent: dict[tuple[str, int], tuple[int, dict[str, np.ndarray]]]) -> None:
    """Upload ``ROUNDS`` updates, each resent every 2 s until acknowledged (at-least-once).

    ``sent`` records what each upload carried (base version, tensors), for the replay check.
    """
    async with make_client(addr, identifier=f"crash-edge-{site}") as client:
        for seq in range(1, ROUNDS + 1):
            base, update = max(bus.version(), 0), perturbed(tensors, seed=zlib.crc32(f"{site}/{seq}".encode()))
            sent[(f"edge-{site}", seq)] = (base, update)
            payload = update_payload(update, site=site, seq=seq, base_version=base, fingerprint=fingerprint,
                                     rank=RANK, samples=SAMPLES)
            while not bus.acked(site, seq):
                await publish(client, topics.adapter_up(site), payload, sender=f"edge-{site}", seq=seq)
                for _ in range(40):
                    if bus.acked(site, seq):
                        break
                    await asyncio.sleep(0.05)
            await asyncio.sleep(0.15)


async def start_cloud(cfg_path: Path, log: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cloud_aggregator", "--config", str(cfg_path),
        stderr=open(log, "ab"),
    )


async def test_kill_9_mid_stream_then_restart(tmp_path: Path, fresh_mosquitto):
    addr = BrokerAddress(fresh_mosquitto.host, fresh_mosquitto.port)
    cfg = cloud_config(
        tmp_path / "cloud", addr,
        # no share cap: staleness discounts make some shares exceed 1/2, and the replay below is uncapped fedavg
        aggregation={"strategy": "fedavg", "buffer_k": 3, "buffer_period_s": 0.5, "max_share": 1.0},
        limits={"metrics_period_s": 0.5},
    )
    cfg_path = write_cloud_config(cfg, tmp_path / "cloud.toml")
    log = tmp_path / "cloud.log"
    tensors = shared_state(build_edge_model(model_config(RANK)))
    fingerprint = base_fingerprint(model_config(RANK))
    filters = [
        *topics.subscriptions(topics.global_down()),
        *(f for s in SITES for f in topics.subscriptions(topics.site_feedback(s))),
        topics.metrics(Role.CLOUD, cfg.cloud_id),
        topics.status(Role.CLOUD, cfg.cloud_id),
    ]
    sent: dict[tuple[str, int], tuple[int, dict[str, np.ndarray]]] = {}
    with Collector(addr, *filters) as col:
        bus = Bus(col)
        proc = await start_cloud(cfg_path, log)
        try:
            await eventually(lambda: bus.version() >= 0, 60, what="v0 from the first process")
            edges = [asyncio.create_task(edge(s, addr, bus, tensors, fingerprint, sent)) for s in SITES]
            await eventually(lambda: bus.version() >= 2, 60, what="version 2")
            proc.send_signal(signal.SIGKILL)  # mid-stream: the edges keep uploading into the broker
            assert await proc.wait() == -signal.SIGKILL
            await asyncio.sleep(0.5)
            with Ledger(cfg.state_dir) as ledger:
                killed_at = ledger.latest_version()
                accepted_before = ledger.counts()[0]
            assert killed_at is not None and killed_at >= 2
            assert accepted_before < len(SITES) * ROUNDS, "the kill must land mid-stream"
            mark = len(col.envelopes)

            proc = await start_cloud(cfg_path, log)
            # the restarted process re-announces the global it had committed, at the same version
            first = await eventually(
                lambda: next((b for b in bus.bodies(mark) if isinstance(b, GlobalAdapter)), None), 60,
                what="re-published global",
            )
            assert first.version == killed_at
            await asyncio.wait_for(asyncio.gather(*edges), 90)
            await eventually(lambda: _metrics(col, cfg.cloud_id, accepted=len(SITES) * ROUNDS), 30,
                             what="all accepted and aggregated")
            proc.send_signal(signal.SIGTERM)  # clean shutdown: exit 0, retained status offline
            assert await asyncio.wait_for(proc.wait(), 30) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        await eventually(lambda: _status(col) == "offline", 10, what="offline status")

    with Ledger(cfg.state_dir) as ledger:
        final = ledger.latest_version()
        assert final is not None and final > killed_at
        assert ledger.pending_count() == 0
        applied = [u for v in range(1, final + 1) for u in ledger.applied_in(v)]
        expected = [(f"edge-{s}", q) for s in SITES for q in range(1, ROUNDS + 1)]
        assert sorted(applied) == sorted(expected), "every upload applied exactly once"
        assert ledger.rejections() == []  # resends after the crash are refused without a disk write
        # replay every version from what the edges sent, in plain numpy from the documented maths: each
        # stored global is exactly its predecessor plus the updates the ledger says it consumed, so none
        # was applied twice or skipped.  fedavg: A = Σ w A_k, B = Σ w (alpha/r) B_k with w ∝ n_k d_k;
        # d_k = (1 + s_k)^-1/2 with s_k = (v - 1) - base_k; FedBuff step ᾱ = Σ d n / Σ n, x + ᾱ (agg - x)
        prev = {n: t.astype(np.float64) for n, t in ledger.load_global(0).tensors.items()}
        for v in range(1, final + 1):
            ups, ds = [], []
            for edge_id, seq in ledger.applied_in(v):
                base, update = sent[(edge_id, seq)]
                ups.append(ref.Up({n: t.astype(np.float64) for n, t in update.items()}, RANK, 2.0 * RANK, SAMPLES))
                ds.append(ref.polynomial(v - 1 - base, 0.5))
            replay = ref.mix(prev, ref.aggregate("fedavg", prev, ups, ds), ref.steps(ups, ds))
            stored = {n: t.astype(np.float64) for n, t in ledger.load_global(v).tensors.items()}
            assert stored.keys() == replay.keys()
            for name in replay:
                np.testing.assert_allclose(stored[name], replay[name], rtol=2e-5, atol=2e-6, err_msg=f"v{v} {name}")
            prev = stored
    assert "Traceback" not in log.read_text()


def _metrics(col: Collector, cloud_id: str, accepted: int) -> bool:
    topic = topics.metrics(Role.CLOUD, cloud_id)
    docs = [decode_metrics(p)["metrics"] for t, p, _ in col.raw if t == topic]
    return bool(docs) and docs[-1]["accepted"] == accepted and docs[-1]["pending"] == 0


def _status(col: Collector) -> str | None:
    docs = [Status.decode(p) for t, p, _ in col.raw if t.startswith(f"{topics.ROOT}/status/") and p]
    return docs[-1].state if docs else None
