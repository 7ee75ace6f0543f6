"""Inference workers beside an edge split its site's prediction requests (MQTT 5 shared subscriptions).

Real parts only: a Mosquitto of the test's own (MQTT 5) and the embedded amqtt broker (3.1.1), a real edge
agent that trains a round and exports its ONNX model, worker processes it spawns (``inference_workers``),
real devices (the SDK) asking for predictions, and a plain subscriber that sees every answer with its sender.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from broker import topics
from broker.address import BrokerAddress
from broker.metrics import Counters
from broker.wire import ErrorReport, Kind, Prediction, decode_envelope
from edge_agent.config import EdgeConfig
from edge_agent.infer_worker import InferWorker
from edge_agent.training.toy_task import ToyTask
from edge_agent.worker_processes import WorkerProcesses
from tests.edge.test_edge_onnx import run_onnx
from tests.support.collector import Collector
from tests.support.edge_testkit import Device, edge_config, eventually, record, running, uid

ROOT = Path(__file__).resolve().parents[2]
WORKERS = 2


def config_for(tmp_path: Path, addr: BrokerAddress, protocol: str, workers: int) -> EdgeConfig:
    """An edge that exports ONNX after its first round (what the workers serve) and asks for ``workers``."""
    return edge_config(tmp_path / "state", addr, {
        "broker": f"mqtt://{addr.host}:{addr.port}?protocol={protocol}",
        "inference_workers": workers,
        "training": {"onnx": "on", "onnx_min_interval_s": 0.0},
    })


class Answers:
    """Every prediction on the site's downlinks, by (device, sample), with the sender that computed it."""

    def __init__(self, collector: Collector) -> None:
        self.collector = collector

    def all(self) -> list[tuple[str, str, int, Prediction]]:
        out = []
        for _topic, env in list(self.collector.envelopes):
            if env.kind is Kind.PREDICTION:
                p = Prediction.from_body(env.body)
                out.append((env.sender, p.device, p.sample, p))
        return out

    def seqs(self, sender: str) -> list[int]:
        """The envelope seqs of ``sender``'s predictions, in arrival order."""
        return [env.seq for _, env in list(self.collector.envelopes)
                if env.kind is Kind.PREDICTION and env.sender == sender]

    def for_samples(self, wanted: set[tuple[str, int]]) -> list[tuple[str, str, int, Prediction]]:
        return [a for a in self.all() if (a[1], a[2]) in wanted]


async def ask(devices: list[Device], samples: list[dict[str, Any]], first: int) -> dict[tuple[str, int], int]:
    """One request per sample, devices in turn; returns (device, sample id) -> index into ``samples``."""
    sent: dict[tuple[str, int], int] = {}
    for i, sample in enumerate(samples):
        dev = devices[i % len(devices)]
        sid = first + i
        await dev.infer(record(dev.id, sid, sample, label=False))
        sent[(dev.id, sid)] = i
    return sent


def predictions(site: str) -> str:
    """Every prediction downlink of ``site`` (whole messages: an answer is one packet)."""
    return topics.device_down(site, "any", topics.Downlink.PREDICTION).replace("/device/any/", "/device/+/")


def joined(log: Path, times: int = 1) -> bool:
    return log.exists() and log.read_text(errors="replace").count("joined group") >= times


async def test_workers_split_requests_each_answered_once_and_a_killed_worker_loses_its_own_and_comes_back(
    fresh_mosquitto: Any, tmp_path: Path
) -> None:
    addr = BrokerAddress(fresh_mosquitto.host, fresh_mosquitto.port)
    config = config_for(tmp_path, addr, "auto", WORKERS)
    task = ToyTask(config.model, seed=11)
    figures: dict[str, Any] = {}
    async with running(config, timeout=120) as agent:
        assert agent._mqtt is not None and agent._mqtt.negotiator.version == "5"
        assert agent.counters["mqtt_protocol.5"] >= 1 and agent.counters["mqtt_v5"] == 1.0
        procs = agent.workers.procs
        assert len(procs) == WORKERS and all(p.poll() is None for p in procs)
        names = [f"{config.edge_id}-w{i}" for i in range(1, WORKERS + 1)]
        devices = [await Device(config.site, uid("dev"), addr, tmp_path).start() for _ in range(2)]
        prediction_filter = predictions(config.site)
        collector = Collector(addr, prediction_filter).start()
        answers = Answers(collector)
        try:
            await eventually(lambda: all(d.received(Kind.CONFIG) for d in devices), what="configs")
            await devices[0].publish([record(devices[0].id, i, s) for i, s in enumerate(task.samples(40))])
            await eventually(lambda: agent.model_artifact is not None, 120, "the edge's first export")
            logs = [agent.workers.log_path(n) for n in names]
            await eventually(lambda: all(joined(p) for p in logs), 120, "workers in the group")

            # 1. every request answered exactly once, the load split over the edge and both workers
            samples = [{"modalities": s["modalities"]} for s in ToyTask(config.model, seed=12).samples(90)]
            sent = await ask(devices, samples, 1000)
            await eventually(lambda: len(answers.for_samples(set(sent))) >= len(sent), 60, "90 answers")
            await asyncio.sleep(1.0)  # a duplicate would arrive now
            got = answers.for_samples(set(sent))
            keys = [(d, s) for _, d, s, _ in got]
            assert sorted(keys) == sorted(sent), "each request answered exactly once"
            by_sender = {n: sum(1 for a in got if a[0] == n) for n in [config.edge_id, *names]}
            assert all(v > 0 for v in by_sender.values()), by_sender
            assert sum(by_sender.values()) == len(sent)
            figures["split_90"] = by_sender
            for name in by_sender:  # each member numbers its answers: strictly increasing, as the spec asks
                seqs = answers.seqs(name)
                assert seqs == sorted(set(seqs)), name
            # the answers are the exported model's (the test's own onnxruntime run of the file on disk)
            reference = run_onnx((config.state_path / "export" / "model.onnx").read_bytes(), samples, config.model)
            for _sender, dev, sid, p in got:
                np.testing.assert_allclose(p.probs, reference[sent[(dev, sid)]], atol=1e-5)
                assert p.label == int(np.argmax(reference[sent[(dev, sid)]]))

            # 2. a worker hangs (SIGSTOP) while requests come in, then is killed (SIGKILL)
            victim = procs[0]
            restarts = agent.counters["inference_worker_restarts"]
            joins = logs[0].read_text(errors="replace").count("joined group")
            os.kill(victim.pid, signal.SIGSTOP)
            stuck_samples = [{"modalities": s["modalities"]} for s in ToyTask(config.model, seed=13).samples(60)]
            stuck_sent = await ask(devices, stuck_samples, 2000)
            await asyncio.sleep(3.0)
            answered_while_stopped = len(answers.for_samples(set(stuck_sent)))
            os.kill(victim.pid, signal.SIGKILL)
            victim.wait(10)
            await asyncio.sleep(5.0)  # time for the broker to hand the dead worker's requests to the group, if it does
            after_kill = answers.for_samples(set(stuck_sent))
            stuck = len(stuck_sent) - answered_while_stopped
            figures["hung_then_killed"] = {
                "requests": len(stuck_sent), "answered_while_hung": answered_while_stopped,
                "handed_to_the_hung_worker": stuck, "answered_after_kill": len(after_kill) - answered_while_stopped,
                "lost": len(stuck_sent) - len(after_kill),
            }
            assert stuck > 0, "round-robin gave the hung worker none of 60 requests"
            assert names[0] not in {a[0] for a in after_kill}
            assert len({(d, s) for _, d, s, _ in after_kill}) == len(after_kill), "no request answered twice"

            # 3. the edge starts the dead worker again; every new request answered once, by all three
            await eventually(lambda: joined(logs[0], joins + 1), 120, "the killed worker back in the group")
            assert agent.counters["inference_worker_restarts"] == restarts + 1 and procs[0] is not victim
            more = [{"modalities": s["modalities"]} for s in ToyTask(config.model, seed=14).samples(60)]
            more_sent = await ask(devices, more, 3000)
            await eventually(lambda: len(answers.for_samples(set(more_sent))) >= len(more_sent), 60, "60 answers")
            await asyncio.sleep(1.0)
            later = answers.for_samples(set(more_sent))
            assert sorted((d, s) for _, d, s, _ in later) == sorted(more_sent)
            later_by = {n: sum(1 for a in later if a[0] == n) for n in (config.edge_id, *names)}
            assert sum(later_by.values()) == len(more_sent) and all(v > 0 for v in later_by.values()), later_by
            figures["after_restart_60"] = later_by
        finally:
            collector.stop()
            for d in devices:
                await d.close()
    assert len(procs) == WORKERS and all(p.poll() is not None for p in procs), "the edge stopped its workers"
    print("shared inference figures:", json.dumps(figures))


async def test_on_a_3_1_1_broker_no_worker_serves_and_the_edge_answers_every_request_once(
    embedded_addr: BrokerAddress, tmp_path: Path
) -> None:
    addr = embedded_addr
    config = config_for(tmp_path, addr, "auto", WORKERS)
    config.training.onnx = "off"  # the edge serves torch; the workers never get as far as a model
    async with running(config, timeout=120) as agent:
        assert agent._mqtt is not None and agent._mqtt.negotiator.version == "3.1.1"
        assert agent.counters["protocol_fallbacks"] == 1 and agent.counters["mqtt_v5"] == 0.0
        assert agent.counters["inference_workers_refused"] == 1 and agent.workers.procs == []
        # a worker started by hand refuses, says why, and exits 3
        path = config.write(tmp_path / "edge.toml")
        worker = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "edge_agent.infer_worker", "--config", str(path),
                             "--worker-id", "w9"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert worker.returncode == 3, worker.stderr[-2000:]
        assert "speaks MQTT 3.1.1 only: no shared subscriptions" in worker.stderr
        devices = [await Device(config.site, uid("dev"), addr, tmp_path).start() for _ in range(2)]
        prediction_filter = predictions(config.site)
        collector = Collector(addr, prediction_filter).start()
        answers = Answers(collector)
        try:
            await eventually(lambda: all(d.received(Kind.CONFIG) for d in devices), what="configs")
            samples = [{"modalities": s["modalities"]} for s in ToyTask(config.model, seed=15).samples(40)]
            sent = await ask(devices, samples, 1)
            await eventually(lambda: len(answers.for_samples(set(sent))) >= len(sent), 60, "40 answers")
            await asyncio.sleep(1.0)
            got = answers.for_samples(set(sent))
            assert sorted((d, s) for _, d, s, _ in got) == sorted(sent)
            assert {a[0] for a in got} == {config.edge_id}
        finally:
            collector.stop()
            for d in devices:
                await d.close()


def test_megace_infer_with_protocol_3_1_1_refuses_before_connecting(tmp_path: Path) -> None:
    """``--protocol 3.1.1`` (the flag sets MEGACE_BROKER_PROTOCOL for a URL that names none): no $share ever."""
    config = edge_config(tmp_path / "state", BrokerAddress("127.0.0.1", 9), {"broker": "mqtt://127.0.0.1:9"})
    path = config.write(tmp_path / "edge.toml")
    env = {k: v for k, v in os.environ.items() if k != "MEGACE_BROKER_PROTOCOL"}
    megace = str(Path(sys.executable).parent / "megace")
    worker = subprocess.run([megace, "infer", "--config", str(path), "--worker-id", "w1", "--protocol", "3.1.1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert worker.returncode == 3, worker.stderr[-2000:]
    assert "inference workers need MQTT 5" in worker.stderr
    bad = subprocess.run([megace, "infer", "--config", str(path), "--worker-id", "w1", "--protocol", "6"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 2 and "must be one of auto, 5, 3.1.1" in bad.stderr


def test_a_restarted_worker_numbers_its_answers_above_everything_it_sent_before(tmp_path: Path) -> None:
    config = edge_config(tmp_path / "state", BrokerAddress("127.0.0.1", 9), {"broker": "mqtt://127.0.0.1:9?protocol=5"})
    first = InferWorker(config, "w1")
    sent = [first.core.down("d1", Kind.ERROR, _error()).payload for _ in range(3)]
    again = InferWorker(config, "w1")
    later = again.core.down("d1", Kind.ERROR, _error()).payload
    seqs = [decode_envelope(p).seq for p in sent]
    assert seqs == sorted(set(seqs)) and decode_envelope(later).seq > seqs[-1]
    assert decode_envelope(later).sender == "w1"


def _error() -> ErrorReport:
    return ErrorReport(code="internal", message="x", ref=None)


def test_an_edge_with_an_identity_spawns_no_worker_that_would_take_over_its_session(tmp_path: Path) -> None:
    """With ``use_username_as_clientid`` (the secure set-up) a worker logging in as the edge would become the
    edge's client id and kick it off; without ``worker_identities`` (workers' own, ``megace provision workers``:
    ``tests/security/test_secure_workers.py``) the edge refuses to spawn such workers, and says so."""
    config = edge_config(tmp_path / "state", BrokerAddress("127.0.0.1", 9), {
        "broker": "mqtt://megace-edge-e0@127.0.0.1:9?protocol=auto", "inference_workers": 2})
    workers = WorkerProcesses(config, config.inference_workers)
    counters = Counters()
    workers.on_connected(True, counters)
    assert workers.procs == [] and counters["inference_workers_refused"] == 1
    assert not (config.state_path / "infer-worker.toml").exists()
    plain = edge_config(tmp_path / "plain", BrokerAddress("127.0.0.1", 9), {"inference_workers": 2})
    refused = WorkerProcesses(plain, 2)
    refused.on_connected(False, counters)  # 3.1.1: none either
    assert refused.procs == [] and counters["inference_workers_refused"] == 2


async def test_an_auto_edge_with_a_clean_session_falls_back_on_amqtt_which_never_answers_its_connect(
    embedded_addr: BrokerAddress, tmp_path: Path
) -> None:
    """amqtt never answers an MQTT 5 CONNECT carrying a will (every service sends one); a clean session makes no
    probe first, so ``auto`` must take the missing CONNACK as a refusal (``megace run``'s edges, on its embedded
    broker, retried MQTT 5 forever). ``timeout=3``: each silent CONNECT costs the address's CONNACK timeout."""
    config = edge_config(tmp_path / "state", embedded_addr, {
        "broker": f"mqtt://{embedded_addr.host}:{embedded_addr.port}?protocol=auto&timeout=3",
        "persistent_session": False})
    async with running(config, timeout=40) as agent:
        assert agent._mqtt is not None and agent._mqtt.negotiator.version == "3.1.1"
        assert agent.counters["protocol_fallbacks"] == 1 and agent.counters["mqtt_protocol.3.1.1"] >= 1
        assert agent.counters["mqtt_protocol.5"] == 0


async def test_an_edge_without_workers_takes_every_request_itself_even_beside_an_offline_group_member(
    fresh_mosquitto: Any, tmp_path: Path
) -> None:
    """Mosquitto keeps handing a shared group's offline durable member its share: an edge replaced under a new id
    left half of its site's requests to the old one's session. An edge with no workers subscribes plainly."""
    addr = BrokerAddress(fresh_mosquitto.host, fresh_mosquitto.port)
    site = uid("site")
    old = edge_config(tmp_path / "old", addr, {"site": site, "edge_id": "old", "shared_inference": True,
                                               "broker": f"mqtt://{addr.host}:{addr.port}?protocol=5"})
    async with running(old, timeout=60) as agent:
        assert agent._mqtt is not None and agent._mqtt.negotiator.version == "5"
    new = edge_config(tmp_path / "new", addr, {"site": site, "edge_id": "new",
                                               "broker": f"mqtt://{addr.host}:{addr.port}?protocol=5"})
    assert not new.joins_infer_group and old.joins_infer_group
    async with running(new, timeout=60):
        devices = [await Device(site, uid("dev"), addr, tmp_path).start() for _ in range(2)]
        collector = Collector(addr, predictions(site)).start()
        answers = Answers(collector)
        try:
            await eventually(lambda: all(d.received(Kind.CONFIG) for d in devices), what="configs")
            samples = [{"modalities": s["modalities"]} for s in ToyTask(new.model, seed=16).samples(20)]
            sent = await ask(devices, samples, 1)
            await eventually(lambda: len(answers.for_samples(set(sent))) >= len(sent), 30, "20 answers")
            assert sorted((d, s) for _, d, s, _ in answers.for_samples(set(sent))) == sorted(sent)
            assert {a[0] for a in answers.for_samples(set(sent))} == {"new"}
        finally:
            collector.stop()
            for d in devices:
                await d.close()
