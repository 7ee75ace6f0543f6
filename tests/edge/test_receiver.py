"""``ingest_receiver = "process"`` on a real Mosquitto: the receiver process logs and acknowledges, the agent
ingests from its log. SIGKILL of the receiver mid-stream loses nothing the broker acknowledged to the device
and takes nothing twice; duplicates are dropped across the split; a slow agent holds the receiver back.

Records are published by a raw paho client (QoS 1), each carrying its own number in ``env[0]``; the
expectation is the set of numbers the broker acknowledged, the observation the agent's replay buffer.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import paho.mqtt.client as mqtt
import psutil
import pytest

from broker import topics
from broker.address import BrokerAddress
from broker.runners import MosquittoBroker
from broker.wire import FeatureRecord, Kind, encode_envelope
from edge_agent.config import EdgeConfig
from edge_agent.service import EdgeAgent
from edge_agent.training.toy_task import ToyTask, toy_config
from tests.support.collector import Collector
from tests.support.edge_testkit import edge_config, eventually, running, toy_profile

pytestmark = pytest.mark.timeout(300)


def _config(tmp: Path, broker: MosquittoBroker, **limits: Any) -> EdgeConfig:
    return edge_config(tmp / "state", BrokerAddress(broker.host, broker.port), {
        "ingest_receiver": "process",
        "training": {"min_new_samples": 10**9},  # no round: the buffer holds exactly what was ingested
        "limits": {"replay_max_total": 100_000, "replay_max_per_device": 100_000, **limits},
    })


class Publisher:
    """A raw paho device: registers, then publishes numbered records at QoS 1 and notes which the broker acked."""

    def __init__(self, broker: MosquittoBroker, site: str, device: str) -> None:
        self.site, self.device = site, device
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{device}",
                                  protocol=mqtt.MQTTv311)
        self.client.max_inflight_messages_set(100)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.pool = ToyTask(toy_config(), seed=5).samples(64)
        self.acked: list[int] = []
        self.lock = threading.Lock()

    def register(self) -> None:
        profile = replace(toy_profile(self.device), epoch=7)
        payload = encode_envelope(Kind.REGISTER, self.device, 0, profile.to_body())
        info = self.client.publish(topics.device_up(self.site, self.device, topics.Uplink.REGISTER), payload, qos=1,
                                   retain=True)
        info.wait_for_publish(10)
        assert info.is_published()

    def payload(self, n: int, seq: int | None = None) -> bytes:
        label = int(self.pool[n % len(self.pool)]["label"])
        imu = np.random.default_rng(n).standard_normal((4, 6)).astype(np.float32)
        rec = FeatureRecord(self.device, n, {"imu": imu, "env": np.full((1, 8), float(n), np.float32)}, label=label)
        return encode_envelope(Kind.FEATURES, self.device, n if seq is None else seq, rec.to_body())

    def publish(self, numbers: list[int], *, pace_every: int = 100,
                gates: dict[int, threading.Event] | None = None) -> None:
        """Publish ``numbers`` (seq = number), waiting for PUBACKs every ``pace_every``; blocking (a thread).
        ``gates``: before publishing number ``n`` in it, wait until its event is set (the test killed something)."""
        topic = topics.device_up(self.site, self.device, topics.Uplink.FEATURES)
        pending: list[tuple[int, mqtt.MQTTMessageInfo]] = []
        for n in numbers:
            if gates and n in gates:
                assert gates[n].wait(120), f"gate before record {n} never opened"
            pending.append((n, self.client.publish(topic, self.payload(n), qos=1)))
            if len(pending) >= pace_every:
                self._settle(pending)
        self._settle(pending)

    def _settle(self, pending: list[tuple[int, mqtt.MQTTMessageInfo]]) -> None:
        for n, info in pending:
            info.wait_for_publish(60)
            assert info.is_published(), f"record {n}: no PUBACK from the broker"
            with self.lock:
                self.acked.append(n)
        pending.clear()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def buffered(agent: EdgeAgent, device: str) -> list[int]:
    """The record numbers in the agent's replay buffer for ``device`` (duplicates kept)."""
    assert agent.trainer is not None
    return [int(np.asarray(s.modalities["env"]).ravel()[0]) for s in agent.trainer.buffer.snapshot()
            if s.device_id == device]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_sigkill_of_the_receiver_mid_stream_loses_and_duplicates_nothing(fresh_mosquitto, tmp_path) -> None:
    config = _config(tmp_path, fresh_mosquitto)
    pub = Publisher(fresh_mosquitto, config.site, "dev-k")
    numbers = list(range(1, 2401))
    killed: list[int] = []
    try:
        async with running(config) as agent:
            assert agent.receiver is not None and agent.receiver.pid is not None
            pub.register()
            await eventually(lambda: "dev-k" in agent.registry, what="registration through the receiver")
            # the publisher holds at 801 and 1601 until the kill before it happened: a receiver fast enough to take
            # every record before the test looks must not leave a kill with nothing in flight
            gates = {801: threading.Event(), 1601: threading.Event()}
            sending = asyncio.create_task(asyncio.to_thread(pub.publish, numbers, gates=gates))
            for threshold, gate in ((400, gates[801]), (1200, gates[1601])):  # two kills, each mid-stream
                await eventually(lambda t=threshold: agent.counters["samples_total"] >= t, 120, f"{threshold} records")
                assert agent.counters["samples_total"] < len(numbers), "all ingested before the kill: nothing tested"
                pid = agent.receiver.pid
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                gate.set()
                await eventually(lambda p=pid: agent.receiver.pid not in (None, p), 60, "a restarted receiver")
            await sending
            assert sorted(pub.acked) == numbers  # the broker acknowledged every record to the device
            await eventually(lambda: len(buffered(agent, "dev-k")) >= len(numbers), 120, "every record ingested")
            await asyncio.sleep(1.0)  # redeliveries after the kills would land now
            got = buffered(agent, "dev-k")
            restarts = agent.counters["receiver_restarts"]
            last = agent.receiver.process
        duplicates, total = agent.counters["duplicates"], agent.counters["samples_total"]  # as checkpointed
        assert sorted(got) == numbers, (len(got), sorted(set(numbers) - set(got))[:10])
        assert restarts >= 2 and not any(alive(p) for p in killed)
        assert last is not None and last.returncode == 0  # a clean stop: it drained and exited on its own

        # the checkpoint written at the clean stop holds every record; a restart re-ingests none of them
        async with running(config) as again:
            assert sorted(buffered(again, "dev-k")) == numbers
            await asyncio.sleep(1.5)
            assert sorted(buffered(again, "dev-k")) == numbers
            assert (again.counters["duplicates"], again.counters["samples_total"]) == (duplicates, total)
    finally:
        pub.close()


async def test_duplicates_are_dropped_across_the_split(fresh_mosquitto, tmp_path) -> None:
    config = _config(tmp_path, fresh_mosquitto)
    pub = Publisher(fresh_mosquitto, config.site, "dev-d")
    first = list(range(1, 301))
    try:
        async with running(config) as agent:
            assert agent.receiver is not None
            pub.register()
            await eventually(lambda: "dev-d" in agent.registry, what="registration")
            await asyncio.to_thread(pub.publish, first)
            await eventually(lambda: len(buffered(agent, "dev-d")) >= 300, 60, "first pass")
            pid = agent.receiver.pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)  # the copies arrive through a fresh receiver, into the same log
            await eventually(lambda: agent.receiver.pid not in (None, pid), 60, "a restarted receiver")
            await asyncio.to_thread(pub.publish, first)  # the same seqs again: a device re-sending after a reset
            await asyncio.to_thread(pub.publish, [301, 302])
            await eventually(lambda: 302 in buffered(agent, "dev-d"), 60, "the new records")
            got = buffered(agent, "dev-d")
            duplicates = agent.counters["duplicates"]
        assert sorted(got) == [*first, 301, 302]
        assert duplicates >= 300
    finally:
        pub.close()


async def test_a_lagging_agent_holds_the_receiver_back(fresh_mosquitto, tmp_path) -> None:
    max_lag = 16 * 1024
    config = _config(tmp_path, fresh_mosquitto, ingest_max_lag_bytes=max_lag)
    pub = Publisher(fresh_mosquitto, config.site, "dev-b")
    numbers = list(range(1, 4001))
    topic = topics.device_up(config.site, "dev-b", topics.Uplink.FEATURES)
    frame = 8 + len(msgpack.packb([topic, pub.payload(4000), False], use_bin_type=True))  # header + body
    log_dir = Path(config.state_dir) / "ingest"
    try:
        async with running(config) as agent:
            assert agent.receiver is not None
            pub.register()
            await eventually(lambda: "dev-b" in agent.registry, what="registration")
            await asyncio.sleep(0.5)  # the retained registration's frame is read; nothing else is in the log
            sender = threading.Thread(target=pub.publish, args=(numbers,), kwargs={"pace_every": 500})
            consumed = sum(p.stat().st_size for p in log_dir.glob("seg-*.log"))
            connects = agent.counters["receiver_connects"]
            sender.start()
            time.sleep(6.0)  # blocks this loop, the agent's: it reads nothing while the device streams
            logged = sum(p.stat().st_size for p in log_dir.glob("seg-*.log")) - consumed
            with pub.lock:
                acked = len(pub.acked)
            await asyncio.sleep(0.5)  # the receiver's counters of the blocked seconds reach the agent
            # the receiver stopped acknowledging once the agent lagged max_lag behind; the broker then sends no
            # more than the receiver's in-flight window (MQTT 5 Receive Maximum, 1000) unacknowledged, and once
            # more after a reconnect (what was not acknowledged is delivered again, and logged again)
            windows = 1 + agent.counters["receiver_connects"] - connects
            assert acked >= 2000, f"the device published only {acked} records in 6 s: nothing was tested"
            assert logged <= max_lag + (1000 * windows + 2) * frame, (logged, frame, agent.counters.snapshot())
            assert logged < acked * frame
            await asyncio.to_thread(sender.join, 120)
            await eventually(lambda: len(buffered(agent, "dev-b")) >= len(numbers), 120, "every record after the lag")
            got = buffered(agent, "dev-b")
            held = agent.counters["ingest_backpressure"]
        assert sorted(got) == numbers
        assert held >= 1
    finally:
        pub.close()


async def test_each_start_of_the_receiver_asks_the_devices_to_register_again(fresh_mosquitto, tmp_path) -> None:
    """A device's answer to the request the agent sends when it subscribes may reach no subscriber while the
    receiver process is still starting; each time the receiver (re)subscribes, the edge asks again."""
    config = _config(tmp_path, fresh_mosquitto)
    seen: list[bytes] = []
    tap = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="tap-register", protocol=mqtt.MQTTv311)
    subscribed = threading.Event()
    tap.on_message = lambda _c, _u, msg: seen.append(msg.payload)
    tap.on_subscribe = lambda *_: subscribed.set()
    tap.connect(fresh_mosquitto.host, fresh_mosquitto.port)
    tap.loop_start()
    tap.subscribe(topics.register_request(config.site), qos=1)
    assert subscribed.wait(10)
    try:
        async with running(config) as agent:
            assert agent.receiver is not None and agent.receiver.pid is not None
            # one request when this process subscribed, one when the receiver did
            await eventually(lambda: len(seen) >= 2, 30, "a request per subscriber")
            before, pid = len(seen), agent.receiver.pid
            os.kill(pid, signal.SIGKILL)
            await eventually(lambda: agent.receiver.pid not in (None, pid), 60, "a restarted receiver")
            await eventually(lambda: len(seen) > before, 30, "a request after the receiver came back")
    finally:
        tap.loop_stop()
        tap.disconnect()


async def test_a_stop_signal_to_the_whole_process_group_stops_the_agent_and_its_receiver_cleanly(
        fresh_mosquitto, tmp_path) -> None:
    """systemd's stop (KillMode control-group) and a terminal's Ctrl-C signal every process of the edge, the
    receiver included: the receiver leaves its stop to the agent, which logs, checkpoints and exits 0, with
    every acknowledged record ingested once and the receiver neither dead by the signal nor started again."""
    # a long round starts on the 300th record: the agent finishes it before stopping, so a receiver that died
    # of the signal would be noticed (and started again) meanwhile
    config = replace(_config(tmp_path, fresh_mosquitto),
                     training=replace(_config(tmp_path, fresh_mosquitto).training, min_new_samples=300, steps=400))
    config_path = config.write(tmp_path / "edge.toml")
    log_path = tmp_path / "agent.log"
    topic = topics.metrics(topics.Role.EDGE, config.edge_id, config.site)
    col = Collector(BrokerAddress(fresh_mosquitto.host, fresh_mosquitto.port), topic).start()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "edge_agent", "--config", str(config_path)], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # its own group
    pub = Publisher(fresh_mosquitto, config.site, "dev-t")

    def metrics() -> dict[str, Any]:
        got = [json.loads(p)["metrics"] for t, p, _ in list(col.raw) if t == topic]
        return got[-1] if got else {}

    try:
        await eventually(lambda: metrics().get("receiver_connects", 0) >= 1, 120, "the agent and its receiver")
        receivers = [c for c in psutil.Process(proc.pid).children() if "edge_agent.receiver" in " ".join(c.cmdline())]
        assert len(receivers) == 1
        pub.register()
        await asyncio.to_thread(pub.publish, list(range(1, 301)))
        await eventually(lambda: metrics().get("samples_total", 0) >= 300, 60, "300 records through the receiver")
        await asyncio.sleep(1.0)  # the round is under way
        os.killpg(proc.pid, signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 120) == 0, log_path.read_text()[-3000:]
        assert not receivers[0].is_running() or receivers[0].status() == psutil.STATUS_ZOMBIE
        text = log_path.read_text()
        assert "ingest receiver exited" not in text and "Traceback" not in text, text[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        pub.close()
        col.stop()
    # the checkpoint the clean stop wrote holds each acknowledged record once
    agent = EdgeAgent(config)
    agent._build_sync()  # the trainer and the last checkpoint, as a restart builds them
    assert sorted(buffered(agent, "dev-t")) == sorted(pub.acked) == list(range(1, 301))
