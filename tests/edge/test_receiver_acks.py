"""The receiver's one rule, checked deterministically: no acknowledgement before the log holds the message.

A SIGKILL lands between "acknowledged" and "written" only rarely, so the end-to-end kill tests
(``test_receiver.py``, ``tests/reliability``) would seldom catch an acknowledgement sent too early. Here
the log's commit is held (a disk that stalls: the one fault this test injects) while a real Mosquitto
delivers records to a real :class:`IngestReceiver`; the PUBACKs it sends are recorded on their way out.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

import edge_agent.acks
from broker import topics
from broker.runners import MosquittoBroker, NatsBroker
from edge_agent.ingestlog import IngestLog
from edge_agent.receiver import IngestReceiver, ReceiverSettings, data_filters
from tests.support.edge_testkit import eventually

pytestmark = pytest.mark.timeout(120)


async def test_nothing_is_acknowledged_before_its_commit_returns(fresh_mosquitto: MosquittoBroker, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[int] = []
    real_ack = edge_agent.acks.ack

    def recording_ack(client: Any, message: Any) -> None:
        sent.append(message.mid)
        real_ack(client, message)

    monkeypatch.setattr(edge_agent.acks, "ack", recording_ack)
    settings = ReceiverSettings(broker=f"mqtt://{fresh_mosquitto.host}:{fresh_mosquitto.port}", site="s1",
                                edge_id="e1", directory=str(tmp_path / "ingest"), fsync=True)
    lines: list[str] = []
    receiver = IngestReceiver(settings, lines.append)
    gate = threading.Event()
    commit = receiver.log.commit

    def stalled_commit() -> int:
        gate.wait(60)
        return commit()

    receiver.log.commit = stalled_commit  # type: ignore[method-assign]
    task = asyncio.create_task(receiver.run())
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="acks-pub", protocol=mqtt.MQTTv311)
    try:
        await eventually(lambda: "ready" in lines, what="receiver subscribed")
        pub.connect(fresh_mosquitto.host, fresh_mosquitto.port)
        pub.loop_start()
        topic = topics.device_up("s1", "dev-1", topics.Uplink.FEATURES)
        assert any(mqtt.topic_matches_sub(f, topic) for f in data_filters("s1"))
        infos = [pub.publish(topic, b"record-%d" % i, qos=1) for i in range(50)]
        await asyncio.to_thread(lambda: [i.wait_for_publish(10) for i in infos])
        await eventually(lambda: receiver.log.pending >= 50 or receiver.counters["bytes_down"] >= 50 * 8,
                         what="50 records received")
        await asyncio.sleep(0.5)
        assert sent == [], "acknowledged while the log had not written the messages"
        gate.set()
        await eventually(lambda: len(sent) >= 50, what="acknowledgements after the commit")
        frames = list(IngestLog(settings.directory).replay(1))
        assert [p for _, p, _ in frames] == [b"record-%d" % i for i in range(50)]
        assert "c" in lines  # the agent was told the log grew
    finally:
        gate.set()
        receiver.stop.set()
        await asyncio.wait_for(task, 30)
        pub.disconnect()
        pub.loop_stop()


async def test_a_devices_uplinks_reach_the_log_in_the_order_it_sent_them_even_on_nats(
        nats_broker: NatsBroker, tmp_path: Path) -> None:
    """NATS makes a consumer per subscription filter and does not order deliveries across them: a receiver that
    subscribed per kind logged a device's records before its registration (1 trial in 6 here), and the agent
    refused them as unregistered. One filter for every kind keeps the device's order; its inference requests
    (the agent's, on its own connection) are acknowledged and never logged."""
    for trial in range(12):
        sent, logged, skipped = await _order_trial(nats_broker, tmp_path, trial)
        assert logged == [p for t, p, _ in sent if not p.startswith(b"request")], (trial, logged[:3])
        assert skipped == 4


async def _order_trial(nats_broker: NatsBroker, tmp_path: Path, trial: int
                       ) -> tuple[list[tuple[str, bytes, bool]], list[bytes], float]:
    """A registration, 20 records and 4 inference requests from one device; what the receiver logged."""
    site = f"order-{trial}-{uuid.uuid4().hex[:6]}"
    settings = ReceiverSettings(broker=nats_broker.address.url(pin_protocol=True), site=site,
                                edge_id=f"e-{site}", directory=str(tmp_path / site), fsync=False)
    lines: list[str] = []
    receiver = IngestReceiver(settings, lines.append)
    task = asyncio.create_task(receiver.run())
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{site}", protocol=mqtt.MQTTv311)
    sent = [(topics.device_up(site, "d", topics.Uplink.REGISTER), b"register", True)]
    for i in range(20):
        sent.append((topics.device_up(site, "d", topics.Uplink.FEATURES), b"record-%d" % i, False))
        if i % 5 == 0:
            sent.append((topics.device_up(site, "d", topics.Uplink.INFER), b"request-%d" % i, False))

    def logged() -> list[bytes]:
        return [p for _, p, _ in IngestLog(settings.directory).replay(1)]

    try:
        await eventually(lambda: "ready" in lines, what="receiver subscribed")
        pub.connect(nats_broker.host, nats_broker.port)
        pub.loop_start()
        infos = [pub.publish(t, p, qos=1, retain=r) for t, p, r in sent]
        await asyncio.to_thread(lambda: [i.wait_for_publish(10) for i in infos])
        await eventually(lambda: receiver.counters["infer_skipped"] >= 4 and len(logged()) >= 21, 30,
                         "21 frames logged")
    finally:
        receiver.stop.set()
        await asyncio.wait_for(task, 30)
        pub.loop_stop()
        pub.disconnect()
    return sent, logged(), receiver.counters["infer_skipped"]
