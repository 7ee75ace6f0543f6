"""Durability with a real agent process: SIGKILL while an upload waits for a broker it cannot reach,
restart, and the upload goes out with the same seq and bytes; rounds and seqs continue; no seq is
ever published with two different contents.

The agent reaches the broker through a relay whose agent -> broker direction the test cuts (a half
partition): the agent still receives every record, but nothing it publishes arrives. So it does not
matter when the agent's round runs: its upload cannot reach the broker, by construction, not by timing.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from broker import topics
from broker.address import BrokerAddress
from broker.runners import MosquittoBroker
from broker.wire import Kind, SiteFeedback, decode_envelope, encode_envelope
from edge_agent.config import EdgeConfig
from edge_agent.training.toy_task import ToyTask
from tests.support.collector import Collector
from tests.support.edge_testkit import Device, edge_config, eventually, record, uid

REPO = Path(__file__).resolve().parents[2]


def _start(config_path: Path, log_path: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "edge_agent", "--config", str(config_path)], cwd=REPO,
                                env=env, stdout=log, stderr=subprocess.STDOUT)


class UplinkCut:
    """A TCP relay to the broker; once ``cut`` is set, what the client sends is swallowed (never reaches
    the broker) while what the broker sends still arrives."""

    def __init__(self, upstream: BrokerAddress) -> None:
        self.upstream = upstream
        self.cut = False
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> BrokerAddress:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return BrokerAddress("127.0.0.1", self._server.sockets[0].getsockname()[1])

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            broker_r, broker_w = await asyncio.open_connection(self.upstream.host, self.upstream.port)
        except OSError:
            client_w.close()
            return
        self._writers += [client_w, broker_w]

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, uplink: bool) -> None:
            try:
                while data := await src.read(65536):
                    if uplink and self.cut:
                        continue
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(client_r, broker_w, True), pump(broker_r, client_w, False))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()


def _metrics(col: Collector, edge: str, site: str) -> list[dict]:
    topic = topics.metrics(topics.Role.EDGE, edge, site)
    return [json.loads(p)["metrics"] for t, p, _ in list(col.raw) if t == topic]


def _uploads(col: Collector, site: str) -> list[tuple[int, bytes]]:
    topic = topics.adapter_up(site)
    return [(decode_envelope(p).seq, p) for t, p, _ in list(col.raw) if t == topic]


async def _accept_every_upload(col: Collector, site: str) -> None:
    """Stand in for the cloud's verdicts: each upload seen on the bus is acknowledged in a site feedback
    (the edge keeps an upload until the cloud answers, not until the broker does)."""
    answered: set[int] = set()
    while True:
        seqs = {s for s, _ in _uploads(col, site)}
        if seqs - answered:
            answered |= seqs
            body = SiteFeedback(site=site, version=0, rank=0, tensors={}, accepted=sorted(answered)).to_body()
            col.client.publish(topics.site_feedback(site), encode_envelope(Kind.SITE_FEEDBACK, "cloud",
                                                                           max(answered), body), qos=1)
        await asyncio.sleep(0.1)


def _committed_outbox(state: Path, seq: int) -> Path | None:
    """The outbox file of ``seq`` in the committed generation (CURRENT), if there is one."""
    try:
        current = (state / "CURRENT").read_text().strip()
    except OSError:
        return None
    path = state / "checkpoints" / current / "outbox" / f"{seq}.msgpack"
    return path if path.exists() else None


@pytest.fixture
def broker(fresh_mosquitto: MosquittoBroker) -> MosquittoBroker:
    return fresh_mosquitto


async def test_sigkill_and_restart_resume_without_losing_or_duplicating_uploads(broker, tmp_path) -> None:
    addr = BrokerAddress(broker.host, broker.port)
    relay = UplinkCut(addr)
    via_relay = await relay.start()
    state = tmp_path / "state"
    # rounds start on every 15th new record only (the timer is an hour away): no round depends on timing
    settings = {"edge_id": uid("killme"), "metrics_interval_s": 0.3,
                "training": {"min_new_samples": 15, "interval_s": 3600.0, "steps": 8, "startup_grace_s": 0.5}}
    config: EdgeConfig = edge_config(state, via_relay, settings)
    config_path = config.write(tmp_path / "edge.toml")
    direct = edge_config(state, addr, {**settings, "site": config.site, "edge_id": config.edge_id})
    direct_path = direct.write(tmp_path / "edge-direct.toml")
    log_path = tmp_path / "agent.log"
    task = ToyTask(config.model, seed=4)
    col = Collector(addr, *topics.subscriptions(topics.adapter_up(config.site)),
                    topics.metrics(topics.Role.EDGE, config.edge_id, config.site)).start()
    proc = _start(config_path, log_path)
    dev = None
    verdicts = asyncio.create_task(_accept_every_upload(col, config.site))
    try:
        # a start under load (torch, transformers and the receiver process to import) took over 60 s in a full run
        await eventually(lambda: _metrics(col, config.edge_id, config.site), 120, "agent process metrics")
        dev = await Device(config.site, uid("dev"), addr, tmp_path).start()
        await eventually(lambda: dev.received(Kind.CONFIG), what="config")
        await dev.publish([record(dev.id, i, s) for i, s in enumerate(task.samples(15))])
        # round 1 is uploaded while the agent's uplink works
        await eventually(lambda: [s for s, _ in _uploads(col, config.site)] == [1], 30, "upload seq 1")
        relay.cut = True
        # round 2 runs on records that still reach the agent; its upload is checkpointed, never delivered
        await dev.publish([record(dev.id, 15 + i, s) for i, s in enumerate(task.samples(15))])
        pending_file = await eventually(lambda: _committed_outbox(state, 2), 30, "upload seq 2 committed")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        pending = pending_file.read_bytes()
        assert decode_envelope(pending).seq == 2
        assert [s for s, _ in _uploads(col, config.site)] == [1], "the cut uplink let an upload through"
        await relay.close()
        proc = _start(direct_path, log_path)
        # the restarted agent re-publishes seq 2 byte for byte, and reports round 2 / seq 2
        await eventually(lambda: any(s == 2 for s, _ in _uploads(col, config.site)), 60, "re-published seq 2")
        assert [p for s, p in _uploads(col, config.site) if s == 2] == [pending]
        resumed = await eventually(
            lambda: [m for m in _metrics(col, config.edge_id, config.site) if m["upload_seq"] == 2], 10)
        assert resumed[-1]["round"] == 2 and resumed[-1]["samples_total"] == 30
        # training continues: round 3 uploads seq 3
        await dev.publish([record(dev.id, 30 + i, s) for i, s in enumerate(task.samples(15))])
        await eventually(lambda: any(s == 3 for s, _ in _uploads(col, config.site)), 30, "upload seq 3")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, "clean shutdown must exit 0"
    finally:
        verdicts.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if dev is not None:
            await dev.close()
        col.stop()
        await relay.close()
        print(log_path.read_text()[-3000:])
    by_seq: dict[int, set[bytes]] = defaultdict(set)
    for seq, payload in _uploads(col, config.site):
        by_seq[seq].add(payload)
    assert sorted(by_seq) == [1, 2, 3]
    assert all(len(contents) == 1 for contents in by_seq.values()), "a seq was published with two contents"
    final = _metrics(col, config.edge_id, config.site)[-1]
    assert final["round"] == 3 and final["upload_seq"] == 3 and final["samples_total"] == 45
