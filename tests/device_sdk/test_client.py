"""DeviceClient against real brokers: delivery, store-and-forward, faults on the wire, downlinks."""

from __future__ import annotations

import hashlib
import itertools
import os
import pwd
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from broker import topics
from broker.address import BrokerAddress
from broker.chunking import frames
from broker.dedup import SequenceGuard
from broker.errors import TopicError
from broker.runners import MosquittoBroker, find_mosquitto
from broker.runners.ports import free_port, wait_for_port
from broker.wire import (
    CapabilityProfile,
    DeviceConfig,
    DeviceFeedback,
    FeatureRecord,
    Kind,
    ModalityProfile,
    ModelUpdate,
    Prediction,
    decode_envelope,
    encode_envelope,
)
from broker.wire.status import OFFLINE, ONLINE, Status
from device_sdk import DeviceClient, Overflow, QueueFullError
from tests.support.collector import Collector
from tests.support.relay import TcpRelay

UNREACHABLE = BrokerAddress("127.0.0.1", 1)  # nothing listens on port 1: connects fail at once


def _record(i: int, device: str = "d1") -> FeatureRecord:
    return FeatureRecord(device, i, {"accel": np.full((10, 3), i, np.float32)}, label=i % 4)


def _samples(col: Collector, device: str | None = None) -> list[int]:
    """Sample ids of every features envelope received, duplicates included, in arrival order."""
    return [env.body["sample"] for _, env in list(col.envelopes)
            if env.kind is Kind.FEATURES and (device is None or env.sender == device)]


def _features(col: Collector) -> list[int]:
    """Sample ids received, after exactly-once de-duplication by envelope seq (what an edge keeps)."""
    guard = SequenceGuard()
    return [env.body["sample"] for _, env in list(col.envelopes)
            if env.kind is Kind.FEATURES and guard.accept(env.sender, env.seq)]


def _until(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Wait for a condition with a generous deadline (no sleep-and-hope)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _queued_samples(dev: DeviceClient) -> list[int]:
    return [FeatureRecord.from_body(decode_envelope(p).body).sample for _, _, _, p in dev.store.peek(None, 10**6)]


def test_publish_register_infer_and_downlink_round_trip(any_broker: BrokerAddress, tmp_path: Path) -> None:
    got: list[tuple[Kind, Any]] = []
    seen = threading.Event()

    def on_downlink(kind: Kind, msg: Any) -> None:
        got.append((kind, msg))
        if len(got) == 2:
            seen.set()

    with Collector(any_broker, topics.site_device_uplinks("s1")) as col:
        dev = DeviceClient("s1", "d1", any_broker, on_downlink=on_downlink, store_path=tmp_path / "q.sqlite")
        try:
            assert dev.connect(10)
            assert dev.online
            # the supervisor is findable by name and never keeps a process alive that forgot close()
            assert [t.daemon for t in threading.enumerate() if t.name == "megace-sdk:d1"] == [True]
            reg_seq = dev.register(CapabilityProfile("d1", {"accel": ModalityProfile((10, 3))}))
            seqs = [dev.publish(_record(i)) for i in range(300)]
            infer_seq = dev.request_inference(_record(300))
            assert dev.flush(20)
            assert dev.pending == 0
            col.wait_for(302)
            assert _samples(col) == list(range(300))  # each once, in order, no resend on a healthy link
            by_kind: dict[Kind, list[tuple[str, int]]] = {}
            for t, env in col.envelopes:
                by_kind.setdefault(env.kind, []).append((t, env.seq))
            infer = [FeatureRecord.from_body(env.body) for _, env in col.envelopes if env.kind is Kind.INFER]
            assert [(r.device, r.sample, r.label) for r in infer] == [("d1", 300, 0)]
            assert by_kind[Kind.REGISTER] == [(topics.device_up("s1", "d1", topics.Uplink.REGISTER), reg_seq)]
            assert by_kind[Kind.INFER] == [(topics.device_up("s1", "d1", topics.Uplink.INFER), infer_seq)]
            feats = by_kind[Kind.FEATURES]
            assert feats == [(topics.device_up("s1", "d1", topics.Uplink.FEATURES), s) for s in seqs]
            assert reg_seq < seqs[0] and seqs == sorted(set(seqs)) and infer_seq > seqs[-1]
            assert dev.counters["sent.features"] == 300 and dev.counters["sent.infer"] == 1
            assert dev.counters["acked"] == 301  # every record and the inference request, once each

            # downlink: a config and a prediction reach the callback as typed messages
            pub = col.client
            pub.publish(topics.device_down("s1", "d1", topics.Downlink.CONFIG),
                        encode_envelope(Kind.CONFIG, "edge", 1, DeviceConfig(["accel"]).to_body()), qos=1)
            pub.publish(topics.device_down("s1", "d1", topics.Downlink.PREDICTION),
                        encode_envelope(Kind.PREDICTION, "edge", 2,
                                        Prediction("d1", 5, 2, np.array([0.1, 0.9])).to_body()), qos=1)
            pub.publish(topics.device_down("s1", "d1", topics.Downlink.ERROR), b"\x00garbage", qos=1)
            assert seen.wait(10)
            assert isinstance(got[0][1], DeviceConfig) and got[0][1].modalities == ["accel"]
            assert isinstance(got[1][1], Prediction) and got[1][1].label == 2 and got[1][1].sample == 5
            assert [k for k, _ in got] == [Kind.CONFIG, Kind.PREDICTION]
            _until(lambda: dev.counters["rejected"] >= 1, "the bad downlink to be rejected")
            assert dev.counters["rejected.DecodeError"] == 1  # bad downlink counted, loop alive
            assert dev.counters["received.config"] == 1 and dev.counters["received.prediction"] == 1
        finally:
            assert dev.close(5)
        assert dev.online is False
        _until(lambda: "megace-sdk:d1" not in [t.name for t in threading.enumerate()], "the supervisor to stop")
    # the registration is retained: an edge that starts later still learns the device's capabilities
    with Collector(any_broker, topics.device_up("s1", "d1", topics.Uplink.REGISTER)) as late:
        regs = [env for _, env in late.wait_for(1) if env.kind is Kind.REGISTER]
        # (amqtt may hand a new subscriber the retained message twice: that is the broker's business)
        assert {(env.seq, CapabilityProfile.from_body(env.body).device) for env in regs} == {(reg_seq, "d1")}
        late.client.publish(topics.device_up("s1", "d1", topics.Uplink.REGISTER), b"", qos=1,
                            retain=True).wait_for_publish(5)


def test_register_rejects_another_devices_profile(tmp_path: Path) -> None:
    dev = DeviceClient("s1", "d1", UNREACHABLE, store_path=tmp_path / "q.sqlite")
    try:
        with pytest.raises(ValueError, match="d2"):
            dev.register(CapabilityProfile("d2", {"accel": ModalityProfile((10, 3))}))
    finally:
        dev.close(0.1)


def test_invalid_ids_are_refused_with_the_argument_named(tmp_path: Path) -> None:
    """A site or device id that cannot be a topic level is refused up front, saying which one is wrong."""
    with pytest.raises(TopicError, match="invalid site 'a/b'"):
        DeviceClient("a/b", "d1", UNREACHABLE, store_path=tmp_path / "q.sqlite")
    with pytest.raises(TopicError, match="invalid device 'gw#1'"):
        DeviceClient("s1", "gw#1", UNREACHABLE, store_path=tmp_path / "q.sqlite")


def test_downlink_callback_faults_and_addressing(mosquitto_addr: BrokerAddress, tmp_path: Path) -> None:
    """A raising callback is counted and later messages still arrive; each device gets only its own downlinks."""
    got: list[tuple[Kind, Any]] = []

    def flaky(kind: Kind, msg: Any) -> None:
        got.append((kind, msg))
        if len(got) == 1:
            raise RuntimeError("user bug in the callback")

    a = DeviceClient("s1", "dl-a", mosquitto_addr, on_downlink=flaky, store_path=tmp_path / "a.sqlite")
    b = DeviceClient("s1", "dl-b", mosquitto_addr, store_path=tmp_path / "b.sqlite")  # no callback at all
    pub = Collector(mosquitto_addr, "megace/none").start()
    try:
        assert a.connect(10) and b.connect(10)

        def send(site: str, device: str, kind: Kind, what: topics.Downlink, body: Any, seq: int) -> None:
            info = pub.client.publish(topics.device_down(site, device, what),
                                      encode_envelope(kind, "edge", seq, body), qos=1)
            info.wait_for_publish(10)

        fb = DeviceFeedback(7, {"accuracy": 0.5}, "ok")
        send("s1", "dl-a", Kind.CONFIG, topics.Downlink.CONFIG, DeviceConfig(["accel"], model_version=1).to_body(), 1)
        send("s2", "dl-a", Kind.CONFIG, topics.Downlink.CONFIG, DeviceConfig(["gyro"]).to_body(), 2)  # other site
        send("s1", "dl-b", Kind.FEEDBACK, topics.Downlink.FEEDBACK, fb.to_body(), 3)
        send("s1", "dl-a", Kind.FEEDBACK, topics.Downlink.FEEDBACK, fb.to_body(), 4)
        _until(lambda: len(got) >= 2 and b.counters["received.feedback"] >= 1, "both downlinks")
        assert a.counters["callback_errors"] == 1  # the raising callback was counted...
        assert [k for k, _ in got] == [Kind.CONFIG, Kind.FEEDBACK]  # ...and the next message still arrived
        assert got[0][1].modalities == ["accel"] and got[0][1].model_version == 1
        assert got[1][1] == fb
        assert a.counters["received.config"] == 1 and a.counters["received.feedback"] == 1
        assert b.counters["received.config"] == 0 and b.counters["callback_errors"] == 0

        # a model bigger than one packet travels chunked and reaches the callback whole
        data = np.random.default_rng(1).bytes(100_000)
        model = ModelUpdate(5, hashlib.sha256(data).digest(), {"accel": (4, 3)}, ["accel"], 2, data)
        for t, p in frames(topics.device_down("s1", "dl-a", topics.Downlink.MODEL),
                           encode_envelope(Kind.MODEL, "edge", 5, model.to_body()), sender="edge", seq=5,
                           max_packet=16_384):
            pub.client.publish(t, p, qos=1).wait_for_publish(10)
        _until(lambda: len(got) >= 3, "the chunked model")
        assert got[2] == (Kind.MODEL, model) and a.counters["rejected"] == 0

        # a gateway that was off keeps its session: a downlink sent meanwhile arrives once it is back
        assert b.close(5)
        send("s1", "dl-b", Kind.CONFIG, topics.Downlink.CONFIG, DeviceConfig(["gyro"]).to_body(), 6)
        later: list[tuple[Kind, Any]] = []
        b = DeviceClient("s1", "dl-b", mosquitto_addr, on_downlink=lambda k, m: later.append((k, m)),
                         store_path=tmp_path / "b.sqlite")
        assert b.connect(10)
        _until(lambda: bool(later), "the downlink queued while the gateway was off")
        assert later == [(Kind.CONFIG, DeviceConfig(["gyro"]))]
    finally:
        pub.stop()
        a.close(5)
        b.close(5)


def test_status_is_retained_online_then_offline_and_the_will_covers_a_lost_link(
        mosquitto_addr: BrokerAddress, tmp_path: Path) -> None:
    """Dashboards subscribing late read the device's state from the retained status, last will included."""

    def states(col: Collector, retained_only: bool) -> list[Status]:
        return [Status.decode(p) for _, p, retain in list(col.raw) if p and (retain or not retained_only)]

    def expect(device: str, state: str, watch: Collector) -> Status:
        """``watch`` (subscribed all along) proves the broker published ``state``; a late subscriber must then
        still read it, retained."""
        _until(lambda: [s.state for s in states(watch, False)][-1:] == [state], f"{state} status of {device}")
        with Collector(mosquitto_addr, topics.status(topics.Role.DEVICE, device, "s3")) as late:
            _until(lambda: bool(states(late, True)), f"retained status of {device}")
            got = states(late, True)
            assert [s.state for s in got] == [state]
            return got[0]

    watch = Collector(mosquitto_addr, topics.status(topics.Role.DEVICE, "st-1", "s3"),
                      topics.status(topics.Role.DEVICE, "st-2", "s3")).start()
    relay = TcpRelay(mosquitto_addr)
    dev = DeviceClient("s3", "st-1", mosquitto_addr, store_path=tmp_path / "a.sqlite")
    lost = DeviceClient("s3", "st-2", relay.address, store_path=tmp_path / "b.sqlite")
    try:
        assert dev.connect(10)
        st = expect("st-1", ONLINE, watch)
        assert (st.role, st.id, st.detail) == ("device", "st-1", {"site": "s3"})
        assert dev.close(5)
        assert expect("st-1", OFFLINE, watch).detail == {"site": "s3"}

        assert lost.connect(10)
        expect("st-2", ONLINE, watch)
        relay.close()  # the link is gone for good: the broker publishes the device's last will
        assert expect("st-2", OFFLINE, watch).detail == {"site": "s3"}
        _until(lambda: not lost.online, "the client to notice the lost link")
    finally:
        watch.stop()
        relay.close()
        dev.close(0.1)
        lost.close(0.1)


def test_store_and_forward_across_broker_restart_drops_oldest_when_full(tmp_path: Path) -> None:
    """Offline records wait on disk, bounded: the oldest are dropped (and counted), the rest arrive in order."""
    broker = MosquittoBroker(persistence=True)
    broker.start()
    addr = BrokerAddress(broker.host, broker.port)
    col = Collector(addr, topics.site_device_uplinks("s1"), client_id="durable-col", clean_session=False)
    dev: DeviceClient | None = None
    try:
        col.start()
        dev = DeviceClient("s1", "d1", addr, store_path=tmp_path / "q.sqlite", store_max_records=500,
                           reconnect_max_delay=0.5)
        assert dev.connect(10)
        for i in range(300):
            dev.publish(_record(i))
        assert dev.flush(20)
        assert len(col.wait_for(300)) == 300
        broker.stop()
        _until(lambda: not dev.online, "the client to go offline")
        for i in range(300, 1000):
            dev.publish(_record(i))
        assert len(dev.store) == 500 and dev.store.dropped == 200  # bounded, drops counted
        assert _queued_samples(dev) == list(range(500, 1000))  # the oldest 200 went
        assert dev.counters["dropped_newest"] == 0
        broker.start()
        assert dev.flush(30), f"{dev.pending} records still pending"
        _until(lambda: len(_features(col)) >= 800, "800 records at the subscriber", 30)
        expected = list(range(300)) + list(range(500, 1000))
        assert _features(col) == expected  # every kept record exactly once, in order
        assert dev.counters["acked"] == 800
    finally:
        col.stop()
        if dev is not None:
            dev.close(5)
        broker.close()


def _pid(broker: MosquittoBroker) -> int:
    proc = broker._proc  # the runner has no public pid; the test needs it to freeze the broker
    assert proc is not None
    return proc.pid


def test_records_in_flight_at_a_broker_crash_are_resent_and_counted(
        fresh_mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    """The broker freezes (SIGSTOP) with 50 records in flight, then dies (SIGKILL): all 50 are re-sent once."""
    broker = fresh_mosquitto
    addr = BrokerAddress(broker.host, broker.port)
    col = Collector(addr, topics.site_device_uplinks("s1"), client_id="crash-col", clean_session=False)
    dev: DeviceClient | None = None
    try:
        col.start()
        broker.stop()  # a clean stop saves the subscriber's durable session before the crash
        broker.start()
        _until(col.client.is_connected, "the durable subscriber to reconnect")
        dev = DeviceClient("s1", "d7", addr, store_path=tmp_path / "q.sqlite", reconnect_max_delay=0.5)
        assert dev.connect(10)
        for i in range(100):
            dev.publish(_record(i, "d7"))
        assert dev.flush(20)
        _until(lambda: len(_samples(col)) >= 100, "the first 100 records")
        os.kill(_pid(broker), signal.SIGSTOP)  # no PUBACK can come back now
        for i in range(100, 150):
            dev.publish(_record(i, "d7"))
        assert dev.pending == 50 and len(dev.store) == 0  # all 50 published straight out, in flight
        assert dev.counters["acked"] == 100 and dev.counters["requeued"] == 0
        broker.stop(kill=True)  # SIGKILL: the 50 never reached a running broker
        _until(lambda: dev.counters["disconnects"] >= 1, "the client to see the crash")
        assert dev.counters["requeued"] == 50  # re-queued and counted
        assert _queued_samples(dev) == list(range(100, 150))  # on disk, in order, nothing else
        broker.start()
        assert dev.flush(30), f"{dev.pending} records still pending"
        assert dev.counters["acked"] == 150
        _until(lambda: 149 in _samples(col, "d7"), "the re-sent records", 30)
        assert [s for s in _samples(col, "d7") if s >= 100] == list(range(100, 150))  # once each, in order
        assert _features(col) == list(range(150))
    finally:
        col.stop()
        if dev is not None:
            dev.close(5)


@pytest.mark.parametrize("lost", ["acks", "both-ways"])
def test_records_in_flight_when_the_link_drops_are_resent_and_counted(
        mosquitto_addr: BrokerAddress, tmp_path: Path, lost: str) -> None:
    """A link that swallows PUBACKs (or everything) and then drops: the un-acked records are re-sent.

    The client may have at most 10 publishes on the wire (``max_inflight``) and 20 un-acknowledged
    records (``max_unacked``); a 21st publish waits for acknowledgements. ``acks``: the broker got the
    10 records on the wire, only the acknowledgements were lost, so the subscriber sees those twice and
    de-duplication keeps one. ``both-ways``: nothing arrived, so only the re-send delivers them.
    """
    device = f"dr-{lost}"
    relay = TcpRelay(mosquitto_addr)
    col = Collector(mosquitto_addr, topics.site_device_uplinks("s4")).start()
    dev = DeviceClient("s4", device, relay.address, store_path=tmp_path / "q.sqlite", reconnect_max_delay=0.2,
                       max_inflight=10, max_unacked=20)
    returned: list[int] = []
    publisher = threading.Thread(target=lambda: returned.extend(dev.publish(_record(i, device))
                                                                for i in range(100, 130)), daemon=True)
    try:
        assert dev.connect(10)
        dev.register(CapabilityProfile(device, {"accel": ModalityProfile((10, 3))}))
        for i in range(100):
            dev.publish(_record(i, device))
        assert dev.flush(20)
        _until(lambda: len(_samples(col)) >= 100, "the first 100 records")
        assert relay.hold(up=lost == "both-ways", down=True) == 1
        publisher.start()  # blocks after 20 un-acknowledged records: back-pressure, not a spill to disk
        _until(lambda: dev.pending >= 20, "20 records in flight")
        if lost == "acks":
            _until(lambda: len(_samples(col)) >= 110, "the broker to forward the 10 records on the wire")
        else:
            _until(lambda: relay.held_bytes() >= 10 * 120, "the relay to swallow the records on the wire")
        assert dev.counters["acked"] == 100 and len(dev.store) == 0
        relay.sever()
        publisher.join(30)
        assert not publisher.is_alive() and len(returned) == 30  # the lost link released the publisher
        _until(lambda: dev.counters["connects"] >= 2, "the client to reconnect")
        assert dev.flush(20), f"{dev.pending} records still pending"
        assert dev.counters["requeued"] == 20  # exactly the un-acknowledged ones, counted
        assert dev.counters["acked"] == 130
        originals = list(range(110)) if lost == "acks" else list(range(100))
        expected = originals + list(range(100, 130))
        _until(lambda: len(_samples(col)) >= len(expected), "the re-sent records")
        assert _samples(col) == expected
        assert _features(col) == list(range(130))  # what the edge keeps: each record once, in order
        registrations = [env for _, env in col.envelopes if env.kind is Kind.REGISTER and env.sender == device]
        assert len(registrations) == 2  # re-announced on the new connection
    finally:
        relay.sever()  # releases a publisher still waiting for acknowledgements
        if publisher.ident is not None:
            publisher.join(10)
        # clear the retained registration so no later subscriber to this site sees it
        col.client.publish(topics.device_up("s4", device, topics.Uplink.REGISTER), b"", qos=1,
                           retain=True).wait_for_publish(5)
        col.stop()
        dev.close(5)
        relay.close()


def test_back_pressure_keeps_order_with_a_small_window(mosquitto_addr: BrokerAddress, tmp_path: Path) -> None:
    """With at most 8 records un-acknowledged, a burst still arrives complete and in order."""
    with Collector(mosquitto_addr, topics.site_device_uplinks("s5")) as col:
        dev = DeviceClient("s5", "bp-1", mosquitto_addr, store_path=tmp_path / "q.sqlite", max_inflight=4,
                           max_unacked=8)
        try:
            assert dev.connect(10)
            for i in range(400):
                dev.publish(_record(i, "bp-1"))
                assert len(dev.store) == 0  # waits for acks rather than spilling to disk
            assert dev.flush(20)
            _until(lambda: len(_samples(col)) >= 400, "400 records")
            assert _samples(col) == list(range(400))
            assert dev.counters["acked"] == 400
        finally:
            dev.close(5)


def test_records_stored_offline_survive_a_gateway_restart(tmp_path: Path) -> None:
    """A gateway that booted without a broker, queued records and rebooted still delivers them all."""
    broker = MosquittoBroker()
    addr = BrokerAddress(broker.host, broker.port)
    dev = DeviceClient("s1", "d2", addr, store_path=tmp_path / "q.sqlite", reconnect_max_delay=0.2)
    assert not dev.connect(0.3)
    assert not dev.online
    for i in range(50):
        dev.publish(_record(i, "d2"))
    assert len(dev.store) == 50 and dev.pending == 50
    assert not dev.flush(0.1)  # nothing can be acknowledged without a broker: flush says so
    assert not dev.close(0.1)  # not drained: records stay on disk
    try:
        broker.start()
        with Collector(addr, topics.site_device_uplinks("s1")) as col:
            dev = DeviceClient("s1", "d2", addr, store_path=tmp_path / "q.sqlite")
            reg_seq = dev.register(CapabilityProfile("d2", {"accel": ModalityProfile((10, 3))}))  # before connect
            assert dev.connect(10)
            assert dev.flush(20)
            col.wait_for(51)
            assert _samples(col) == list(range(50))
            assert [env.seq for _, env in col.envelopes if env.kind is Kind.REGISTER] == [reg_seq]  # sent on connect
            assert dev.close(5)
    finally:
        broker.close()


def test_default_store_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without ``store_path`` the queue lives under ``$MEGACE_STATE_DIR``, else ``~/.local/state/megace``."""
    monkeypatch.setenv("MEGACE_STATE_DIR", str(tmp_path / "state"))
    dev = DeviceClient("s1", "dp-1")
    try:
        assert dev.address == BrokerAddress("127.0.0.1", 1883)  # a broker on this host, by default
        assert dev.store.overflow is Overflow.DROP_OLDEST
        dev.publish(_record(0, "dp-1"))
        assert dev.store.path == tmp_path / "state" / "device" / "dp-1.sqlite" and dev.store.path.is_file()
    finally:
        dev.close(0.1)
    monkeypatch.setenv("MEGACE_STATE_DIR", "")  # empty means unset
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    dev = DeviceClient("s1", "dp-2", UNREACHABLE)
    try:
        assert dev.store.path == tmp_path / "home" / ".local" / "state" / "megace" / "device" / "dp-2.sqlite"
        assert dev.store.path.is_file()
    finally:
        dev.close(0.1)


@pytest.fixture
def password_broker(tmp_path: Path) -> Iterator[BrokerAddress]:
    """A Mosquitto that only lets ``gw:s3cret`` in."""
    passwd = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "gw", "s3cret"], check=True, capture_output=True)
    port = free_port()
    conf = tmp_path / "auth.conf"
    # ``user``: run as whoever runs the tests (a root-started Mosquitto would switch to ``mosquitto``,
    # which cannot read pytest's private tmp_path)
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {passwd}\n"
                    f"user {pwd.getpwuid(os.geteuid()).pw_name}\npersistence false\nlog_dest none\n")
    proc = subprocess.Popen([find_mosquitto(), "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_port("127.0.0.1", port)
        yield BrokerAddress("127.0.0.1", port)
    finally:
        proc.terminate()
        proc.wait(10)


def test_login_with_credentials_and_refusal(password_broker: BrokerAddress, tmp_path: Path) -> None:
    """The URL's user and password are sent; a refused login never counts as online, records wait on disk."""
    url = f"mqtt://gw:s3cret@{password_broker.host}:{password_broker.port}"
    col = Collector(password_broker, topics.site_device_uplinks("s6"))
    col.client.username_pw_set("gw", "s3cret")
    with col:
        good = DeviceClient("s6", "au-1", url, store_path=tmp_path / "a.sqlite")
        try:
            assert good.connect(10)
            good.publish(_record(0, "au-1"))
            assert good.flush(20)
            _until(lambda: bool(_samples(col)), "the record")
            assert _samples(col) == [0]
        finally:
            good.close(5)
    bad = DeviceClient("s6", "au-2", url.replace("s3cret", "wrong"), store_path=tmp_path / "b.sqlite")
    try:
        assert not bad.connect(1.0)
        bad.publish(_record(0, "au-2"))
        assert len(bad.store) == 1 and bad.counters["connects"] == 0
    finally:
        bad.close(0.1)


def test_sequence_numbers_are_unique_and_increasing_across_restarts(tmp_path: Path) -> None:
    """More records than one reserved block, then a restart: no sequence number is ever reused."""
    path = tmp_path / "q.sqlite"
    dev = DeviceClient("s1", "d3", UNREACHABLE, store_path=path)
    first = [dev.publish(_record(i, "d3")) for i in range(1200)]
    dev.close(0.1)
    dev2 = DeviceClient("s1", "d3", UNREACHABLE, store_path=path)
    second = [dev2.publish(_record(i, "d3")) for i in range(1200, 1210)]
    try:
        seqs = first + second
        assert all(a < b for a, b in itertools.pairwise(seqs))  # strictly increasing, so unique
        rows = dev2.store.peek(None, 10**6)
        assert [s for _, s, _, _ in rows] == seqs  # the first client's unsent records are still queued
        assert [decode_envelope(p).seq for _, _, _, p in rows] == seqs  # and carry the seq they were given
        assert _queued_samples(dev2) == list(range(1210))
    finally:
        dev2.close(0.1)


def test_overflow_policies(tmp_path: Path) -> None:
    oldest = DeviceClient("s1", "d4", UNREACHABLE, store_path=tmp_path / "a.sqlite", store_max_records=10)
    try:
        for i in range(25):
            oldest.publish(_record(i, "d4"))
        assert len(oldest.store) == 10 and oldest.store.dropped == 15 and oldest.pending == 10
        assert _queued_samples(oldest) == list(range(15, 25))  # the oldest were dropped
        assert oldest.counters["sent.features"] == 25
    finally:
        oldest.close(0.1)

    newest = DeviceClient("s1", "d6", UNREACHABLE, store_path=tmp_path / "c.sqlite", store_max_records=10,
                          overflow="drop-newest")
    try:
        for i in range(25):
            newest.publish(_record(i, "d6"))
        assert len(newest.store) == 10 and newest.store.dropped == 15
        assert newest.counters["dropped_newest"] == 15
        assert _queued_samples(newest) == list(range(10))  # the newest were dropped
    finally:
        newest.close(0.1)

    strict = DeviceClient("s1", "d5", UNREACHABLE, store_path=tmp_path / "b.sqlite", store_max_records=3,
                          overflow=Overflow.ERROR)
    try:
        for i in range(3):
            strict.publish(_record(i, "d5"))
        with pytest.raises(QueueFullError, match=r"holds 3 records \(max 3\)"):  # says why, for the operator
            strict.publish(_record(3, "d5"))
        assert _queued_samples(strict) == [0, 1, 2]  # nothing queued was lost
    finally:
        strict.close(0.1)


def test_large_record_is_chunked_end_to_end(mosquitto_addr: BrokerAddress, tmp_path: Path) -> None:
    big = FeatureRecord("d6", 0, {"image": np.random.default_rng(0).random((1024, 1024), dtype=np.float32)})
    with Collector(mosquitto_addr, *topics.subscriptions(topics.site_device_uplinks("s1"))) as col:
        dev = DeviceClient("s1", "d6", mosquitto_addr, store_path=tmp_path / "q.sqlite", max_packet=65_536)
        try:
            assert dev.connect(10)
            seq = dev.publish(big)
            assert dev.flush(30)
            deadline = time.monotonic() + 30
            while not (feats := [e for _, e in col.envelopes if e.kind is Kind.FEATURES and e.sender == "d6"]):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            rec = FeatureRecord.from_body(feats[0].body)
            assert np.array_equal(rec.modalities["image"], big.modalities["image"])
            chunks = [p for t, p, _ in col.raw if "/chunk/" in t]
            assert len(chunks) >= 4 * 1024 * 1024 // 65_536 and max(len(p) for p in chunks) <= 65_536
            # every chunk is an envelope of this sender with the record's own seq (SPEC: `n` never goes back)
            assert {(e.kind, e.sender, e.seq) for e in map(decode_envelope, chunks)} == {(Kind.CHUNK, "d6", seq)}
            assert feats[0].seq == seq
        finally:
            dev.close(5)


def test_sdk_import_stays_light() -> None:
    code = ("import sys, device_sdk; heavy = [m for m in ('torch', 'transformers', 'onnxruntime', 'peft', 'aiomqtt')"
            " if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_reconnect_re_registers_under_a_seq_above_every_seq_used_before(fresh_mosquitto, tmp_path: Path) -> None:
    """An edge resets a device's duplicate guard when a live registration's seq is not above what it saw
    (a device that lost its seq store). Re-sending the old seq after a mere reconnect made the edge take a
    record twice; the registration must come back fresh."""
    addr = BrokerAddress(fresh_mosquitto.host, fresh_mosquitto.port)
    with Collector(addr, topics.site_device_uplinks("s9")) as col:
        dev = DeviceClient("s9", "d9", addr, store_path=tmp_path / "q.sqlite", reconnect_max_delay=0.2)
        try:
            assert dev.connect(10)
            first = dev.register(CapabilityProfile("d9", {"accel": ModalityProfile((10, 3))}))
            seqs = [dev.publish(_record(i, "d9")) for i in range(3)]
            assert dev.flush(10)
            fresh_mosquitto.stop()
            _until(lambda: not dev.online, "the device sees the broker gone")
            fresh_mosquitto.start()
            _until(lambda: dev.online and dev.counters["connects"] >= 2, "the device is back")
            def regs() -> list[int]:
                return [env.seq for _, env in col.envelopes if env.kind is Kind.REGISTER]

            _until(lambda: any(r > max(seqs) for r in regs()), "a re-registration under a fresh seq")
            # the collector may also get the broker's retained copy of the first one again: never another old seq
            assert regs()[0] == first and set(regs()) - {first} and min(set(regs()) - {first}) > max(seqs) > first
        finally:
            dev.close(5)
