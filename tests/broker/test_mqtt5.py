"""MQTT 5 where the broker has it: protocol negotiation with fallback, and session expiry (``broker.protocol``).

Real brokers: Mosquitto 2.0 (MQTT 5), the embedded amqtt broker, NATS 2.9 and RabbitMQ 3.10 (3.1.1 only; they
refuse MQTT 5 with CONNACK "unsupported protocol version"). A broker that hangs up on an MQTT 5 CONNECT (what a strict
3.1.1 broker may do) is a real TCP server that closes the connection: no broker here does that.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import tomllib
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiomqtt
import paho.mqtt.client as mqtt
import pytest

from broker import topics
from broker.address import BrokerAddress
from broker.aio import make_client
from broker.protocol import AUTO, DEFAULT_PROTOCOL, V5, V311, Negotiator, ProtocolSettingError, check_protocol, probe_v5
from broker.session import Session
from broker.wire import CapabilityProfile, ModalityProfile
from device_sdk import DeviceClient


@pytest.fixture
async def hangup_addr() -> AsyncIterator[BrokerAddress]:
    """A TCP server that reads the CONNECT and closes the connection without a CONNACK."""

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(16)
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    yield BrokerAddress("127.0.0.1", server.sockets[0].getsockname()[1])
    server.close()


def wire_version(client: aiomqtt.Client) -> str:
    """The protocol the connected paho client speaks, read from paho (independent of the negotiator)."""
    return {mqtt.MQTTv5: V5, mqtt.MQTTv311: V311}[client._client._protocol]


async def connect_twice(addr: BrokerAddress, *, clean: bool) -> tuple[Session, list[str]]:
    """A Session whose first connection is lost (a broker error) and whose second ends it; the wire versions."""
    seen: list[str] = []

    async def serve(client: aiomqtt.Client, _attempt: int) -> None:
        seen.append(wire_version(client))
        if len(seen) == 1:
            raise aiomqtt.MqttError("dropped by the test")

    session = Session(addr, serve, identifier=f"t-{id(seen)}", clean_session=clean, base_delay=0.05, stable_after=0.0)
    await asyncio.wait_for(session.run(), 60)
    return session, seen


@pytest.mark.parametrize("clean", [True, False], ids=["clean", "durable"])
async def test_auto_speaks_5_to_mosquitto_and_keeps_it(mosquitto_addr: BrokerAddress, clean: bool) -> None:
    session, seen = await connect_twice(dataclasses.replace(mosquitto_addr, protocol=AUTO), clean=clean)
    assert seen == [V5, V5]
    snap = session.counters.snapshot()
    assert snap["mqtt_protocol.5"] == 2 and snap["mqtt_v5"] == 1.0 and "protocol_fallbacks" not in snap


@pytest.mark.parametrize("broker", ["embedded", "nats", "rabbitmq"])
@pytest.mark.parametrize("clean", [True, False], ids=["clean", "durable"])
async def test_auto_falls_back_to_3_1_1_once_and_remembers_it(
    request: pytest.FixtureRequest, broker: str, clean: bool
) -> None:
    addr = request.getfixturevalue(f"{broker}_addr")
    session, seen = await connect_twice(dataclasses.replace(addr, protocol=AUTO), clean=clean)
    assert seen == [V311, V311]
    snap = session.counters.snapshot()
    assert snap["protocol_fallbacks"] == 1, "one refusal, then 3.1.1 for every reconnect"
    assert snap["mqtt_protocol.3.1.1"] == 2 and snap["mqtt_v5"] == 0.0
    assert snap.get("connect_failures", 0) == 0, "a refused version is not an outage"


async def test_auto_falls_back_when_the_broker_hangs_up_during_connect(hangup_addr: BrokerAddress) -> None:
    negotiator = Negotiator(AUTO, name="t")
    client = make_client(hangup_addr, identifier="t", version=negotiator.version)
    with pytest.raises(aiomqtt.MqttError) as caught:
        await asyncio.wait_for(client.__aenter__(), 5)  # at once: aiomqtt alone would wait 10 s for a CONNACK
    assert negotiator.refused_by(caught.value) and negotiator.version == V311
    assert negotiator.counters["protocol_fallbacks"] == 1
    assert not negotiator.refused_by(caught.value), "3.1.1 hung up too: an outage, no second fallback"


async def test_5_never_falls_back_and_3_1_1_never_tries_5(
    embedded_addr: BrokerAddress, mosquitto_addr: BrokerAddress
) -> None:
    session = Session(dataclasses.replace(embedded_addr, protocol=V5), lambda c, a: asyncio.sleep(0),
                      identifier="t-only5", base_delay=0.05, max_delay=0.1)
    task = asyncio.create_task(session.run())
    await asyncio.sleep(2.0)
    task.cancel()
    snap = session.counters.snapshot()
    assert snap["connect_failures"] >= 2 and "connects" not in snap and session.negotiator.version == V5
    _, seen = await connect_twice(dataclasses.replace(mosquitto_addr, protocol=V311), clean=True)
    assert seen == [V311, V311]


def test_a_v5_connection_that_was_accepted_is_never_downgraded() -> None:
    negotiator = Negotiator(AUTO)
    negotiator.connected()
    assert not negotiator.refused("later refusal") and not negotiator.refused_code(0x84)
    assert negotiator.version == V5 and negotiator.counters["mqtt_protocol.5"] == 1
    fresh = Negotiator(AUTO)
    assert not fresh.refused_code(0x87), "not authorized is no reason to change the version"
    assert fresh.refused_code(1) and fresh.version == V311, "3.1.1's 'unacceptable protocol version'"


@pytest.mark.parametrize("broker", ["mosquitto", "embedded", "nats", "rabbitmq"])
def test_probe_says_what_each_broker_speaks_and_its_runner_address_agrees(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, broker: str
) -> None:
    """A runner's address says ``protocol=3.1.1`` exactly when the real broker refuses MQTT 5 (so ``auto``
    never probes a broker megace started knowing the answer); otherwise the client's setting applies."""
    monkeypatch.delenv("MEGACE_BROKER_PROTOCOL", raising=False)
    runner = request.getfixturevalue("mosquitto" if broker == "mosquitto" else f"{broker}_broker")
    speaks_5 = probe_v5(BrokerAddress(runner.host, runner.port), f"probe-{broker}")
    assert speaks_5 is (broker == "mosquitto")
    expected = DEFAULT_PROTOCOL if speaks_5 else V311
    assert (runner.address.host, runner.address.port, runner.address.protocol) == (runner.host, runner.port, expected)
    from_url = BrokerAddress.from_url(runner.url, env={"MEGACE_BROKER_PROTOCOL": "5"})
    assert from_url.protocol == (V5 if speaks_5 else V311), "the URL names 3.1.1; else the environment decides"
    monkeypatch.setenv("MEGACE_BROKER_PROTOCOL", "5")
    assert runner.address.protocol == (V5 if speaks_5 else V311), "a broker without MQTT 5 is never asked for it"


def test_probe_gives_no_verdict_without_a_broker() -> None:
    unused = BrokerAddress("127.0.0.1", 9)  # discard port: connection refused, no verdict
    assert probe_v5(unused, "probe-x") is None


async def test_the_probe_leaves_the_real_session_and_its_queued_messages_alone(mosquitto_addr: BrokerAddress) -> None:
    """The probe uses the session's own client id (a broker may force it: ``use_username_as_clientid``), so it
    must resume the session and acknowledge nothing: what was queued still reaches the real connection."""
    addr = dataclasses.replace(mosquitto_addr, session_expiry=60)
    topic, ident = "t/probe/kept", "probe-keeps-session"
    async with subscriber(addr, ident, V5) as sub:
        await sub.subscribe(topic, qos=1)
    await publish(addr, topic, [b"q1", b"q2"])
    assert await asyncio.to_thread(probe_v5, addr, ident) is True
    async with subscriber(addr, ident, V5) as sub:
        assert sorted(await drain(sub, 2.0)) == [b"q1", b"q2"]


def test_the_setting_comes_from_the_url_or_the_environment_and_bad_values_are_refused() -> None:
    assert BrokerAddress.from_url("mqtt://h", env={}).protocol == V311  # the default (paho's MQTT 5 reads cost)
    assert BrokerAddress("h").protocol == V311
    assert BrokerAddress.from_url(BrokerAddress("h", protocol=V311).url(), env={}).protocol == V311, "a URL keeps 3.1.1"
    a = BrokerAddress.from_url("mqtt://h:1?protocol=auto&session_expiry=2", env={"MEGACE_BROKER_PROTOCOL": "5"})
    assert (a.protocol, a.session_expiry) == (AUTO, 2), "the URL wins over the environment"
    assert BrokerAddress.from_url(a.url()) == a
    b = BrokerAddress.from_url("mqtt://h", env={"MEGACE_BROKER_PROTOCOL": "5", "MEGACE_BROKER_SESSION_EXPIRY": "60"})
    assert (b.protocol, b.session_expiry) == (V5, 60)
    assert [check_protocol(v) for v in ("5.0", "v5", "311", "MQTT3.1.1", "AUTO")] == [V5, V5, V311, V311, AUTO]
    for bad in ("protocol=6", "protocol=", "session_expiry=-1", "session_expiry=4294967296", "session_expiry=1.5"):
        with pytest.raises(ValueError):
            BrokerAddress.from_url(f"mqtt://h?{bad}")
    with pytest.raises(ProtocolSettingError):
        Negotiator("7")


# ---------------------------------------------------------------------------------------------- session expiry

@asynccontextmanager
async def subscriber(addr: BrokerAddress, ident: str, version: str) -> AsyncIterator[aiomqtt.Client]:
    async with make_client(addr, identifier=ident, clean_session=False, version=version) as client:
        yield client


async def drain(client: aiomqtt.Client, wait: float) -> list[bytes]:
    got: list[bytes] = []
    try:
        async with asyncio.timeout(wait):
            async for message in client.messages:
                got.append(bytes(message.payload))  # type: ignore[arg-type]
    except TimeoutError:
        pass
    return got


async def publish(addr: BrokerAddress, topic: str, payloads: list[bytes]) -> None:
    async with make_client(addr, identifier=f"pub-{topic.replace('/', '-')}", version=V311) as pub:
        for p in payloads:
            await pub.publish(topic, p, qos=1)


@pytest.mark.parametrize("version", [V5, V311])
async def test_a_durable_session_survives_within_its_expiry_and_is_gone_after_it(
    mosquitto_addr: BrokerAddress, version: str
) -> None:
    """MQTT 5 with a 2 s expiry: messages queued during a short absence arrive, after 4 s the session is gone.
    3.1.1 (``clean_session=False``): the session has no expiry, the later messages arrive too."""
    addr = dataclasses.replace(mosquitto_addr, session_expiry=2)
    topic = f"t/expiry/{version}"
    ident = f"expiry-{version}"
    async with subscriber(addr, ident, version) as sub:
        await sub.subscribe(topic, qos=1)
    await publish(addr, topic, [b"a1", b"a2", b"a3"])
    async with subscriber(addr, ident, version) as sub:  # at once: well within 2 s
        assert await drain(sub, 2.0) == [b"a1", b"a2", b"a3"]
    await asyncio.sleep(4.0)  # twice the expiry
    await publish(addr, topic, [b"b1", b"b2"])
    async with subscriber(addr, ident, version) as sub:
        later = await drain(sub, 2.0)
    assert later == ([] if version == V5 else [b"b1", b"b2"])


async def test_the_services_session_uses_the_address_expiry(mosquitto_addr: BrokerAddress) -> None:
    """What the edge and the cloud use (``Session``, durable, ``auto``): queued messages arrive after a
    reconnect within the expiry; after it the session is new and empty."""
    addr = dataclasses.replace(mosquitto_addr, protocol=AUTO, session_expiry=2)
    topic = "t/expiry/session"
    received: list[list[bytes]] = []

    async def serve(client: aiomqtt.Client, _attempt: int) -> None:
        if not received:
            await client.subscribe(topic, qos=1)
        received.append(await drain(client, 1.5))

    async def one_session() -> None:
        session = Session(addr, serve, identifier="expiry-svc", clean_session=False)
        await asyncio.wait_for(session.run(), 30)
        assert session.negotiator.version == V5

    await one_session()
    await publish(addr, topic, [b"x1", b"x2"])
    await one_session()
    await asyncio.sleep(4.0)
    await publish(addr, topic, [b"y1"])
    await one_session()
    assert received == [[], [b"x1", b"x2"], []]


# ------------------------------------------------------------------------------------------------- device SDK

@pytest.mark.parametrize(("broker", "expected"), [("mosquitto", V5), ("embedded", V311)])
def test_a_device_on_auto_speaks_what_the_broker_has_and_its_records_arrive(
    request: pytest.FixtureRequest, tmp_path: Path, broker: str, expected: str
) -> None:
    addr = dataclasses.replace(request.getfixturevalue(f"{broker}_addr"), protocol=AUTO)
    got: list[str] = []
    seen = threading.Event()
    watcher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"w-{broker}", protocol=mqtt.MQTTv311)

    def on_message(_c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        got.append(msg.topic)
        seen.set()

    watcher.on_message = on_message
    watcher.connect(addr.host, addr.port)
    site = f"s5{broker}"
    watcher.subscribe(f"megace/v1/site/{site}/device/+/up/+", qos=1)
    watcher.loop_start()
    try:
        client = DeviceClient(site, f"d-{broker}", addr, store_path=tmp_path / "d.sqlite", metrics_interval=0)
        assert client.connect(30.0)
        try:
            assert client.protocol.version == expected
            assert client.counters[f"mqtt_protocol.{expected}"] == 1
            assert client.counters["protocol_fallbacks"] == (1 if expected == V311 else 0)
            client.register(CapabilityProfile(device=f"d-{broker}", modalities={
                "env": ModalityProfile(shape=(8,), rate_hz=1.0)}))
            assert seen.wait(10), "the registration reached a subscriber"
        finally:
            client.close()
    finally:
        watcher.loop_stop()
        watcher.disconnect()
    assert any(t.endswith("/up/register") for t in got)


# ------------------------------------------------------------------------------------------------------ cloud

@pytest.mark.parametrize(("broker", "expected"), [("mosquitto", V5), ("embedded", V311)])
async def test_the_cloud_takes_the_version_from_its_broker_url(
    request: pytest.FixtureRequest, tmp_path: Path, broker: str, expected: str
) -> None:
    """Nothing cloud-specific: ``?protocol=auto`` in the cloud's broker URL, its durable session negotiates."""
    from cloud_aggregator.service import running as cloud_running
    from tests.support.cloud_bus import cloud_config

    addr = request.getfixturevalue(f"{broker}_addr")
    config = cloud_config(tmp_path / "cloud", addr, cloud_id=f"c5-{broker}",
                          broker=f"mqtt://{addr.host}:{addr.port}?protocol=auto")
    try:
        async with cloud_running(config, timeout=120) as agg:
            snap = agg.counters.snapshot()
            assert snap[f"mqtt_protocol.{expected}"] == 1 and snap["mqtt_v5"] == (1.0 if expected == V5 else 0.0)
            assert snap.get("protocol_fallbacks", 0) == (0 if expected == V5 else 1)
    finally:  # the session's broker is shared: a retained global v0 of this cloud's base would reach later edges
        from megace.loop.retained import clear_retained

        clear_retained(addr, [topics.global_down()])


# ------------------------------------------------------------------------------------------------- megace run

@pytest.mark.timeout(300)
def test_megace_run_on_its_embedded_broker_speaks_3_1_1_everywhere_without_a_fallback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The embedded broker's address says 3.1.1 and ``megace run`` carries it to every device, evaluator, edge
    and the cloud (their URLs included): none tries MQTT 5 first, which on amqtt cost a 5 s probe per client.
    A rebuilt address or URL that drops the protocol shows up as a counted fallback."""
    from megace.loop.runner import ClosedLoop
    from megace.loop.settings import LoopSettings

    monkeypatch.delenv("MEGACE_BROKER_PROTOCOL", raising=False)
    loop = ClosedLoop(LoopSettings(
        dataset="basicmotions", dataset_options={"augment": 0}, max_samples=None, edges=2, devices_per_edge=1,
        ranks=(2,), rounds=1, steps_per_round=2, strategy="fedavg", out=tmp_path, global_eval=False,
        round_timeout_s=120.0, services_timeout_s=150.0, time_limit_s=240.0))
    result = loop.run()
    assert len(result.rounds) == 1, result.stopped_because
    clients = {f"device {d.name}": d.client.counters.snapshot() for d in loop.devices + loop.evaluators}
    assert loop.monitor is not None
    with loop.monitor.lock:  # the edges publish their session's counters; the cloud's metrics carry none
        clients.update({f"edge {e}": dict(m) for e, m in loop.monitor.view.edge_metrics.items()})
    assert len(clients) == 2 + len(loop.evaluators) + 2, sorted(clients)
    configs = sorted((tmp_path / "config").glob("*.toml"))
    assert [c.stem for c in configs] == ["cloud", "edge-0", "edge-1"]
    for config in configs:  # what each service process was started with: the broker's protocol, carried
        url = tomllib.loads(config.read_text())["broker"]
        assert BrokerAddress.from_url(url, env={}).protocol == V311, (config.name, url)
    for who, snap in clients.items():
        assert snap.get("mqtt_protocol.3.1.1", 0) >= 1 and snap.get("mqtt_v5", 0) == 0, (who, snap)
        assert snap.get("protocol_fallbacks", 0) == 0 and snap.get("mqtt_protocol.5", 0) == 0, (who, snap)


@pytest.mark.parametrize(("setting", "wire"), [(AUTO, mqtt.MQTTv311), (V311, mqtt.MQTTv311), (V5, mqtt.MQTTv5)])
def test_the_loop_observers_speak_3_1_1_unless_told_5_and_work_either_way(
    mosquitto_addr: BrokerAddress, setting: str, wire: int
) -> None:
    """``megace run``'s monitor and retained clean-up hold clean sessions, which gain nothing from MQTT 5: ``auto``
    speaks 3.1.1 without a probe (any broker carries it); ``5`` (a deployment that asked for it) is honoured."""
    from megace.loop import retained
    from megace.loop.monitor import Monitor

    addr = dataclasses.replace(mosquitto_addr, protocol=setting)
    assert retained._client(addr)._protocol == wire
    monitor = Monitor(addr, tap=False)
    assert monitor.client._protocol == wire
    topic = f"{topics.ROOT}/cloud/down/test-observer-{uuid.uuid4().hex[:8]}"  # under the tree the clean-up searches
    _publish_retained(mosquitto_addr, topic)
    assert topic in retained.find_retained(addr, [retained.downlink_tree()])
    assert topic in retained.clear_retained(addr, [])
    assert topic not in retained.find_retained(addr, [retained.downlink_tree()])


def _publish_retained(addr: BrokerAddress, topic: str) -> None:
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"ret-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv311)
    pub.connect(addr.host, addr.port)
    pub.loop_start()
    try:
        pub.publish(topic, b"stale", qos=1, retain=True).wait_for_publish(10)
    finally:
        pub.disconnect()
        pub.loop_stop()
