"""Inference workers in megace's secure set-up: own identities, ACLs of role ``infer``, grants devices verify.

Real parts: a provisioned folder (``megace.provision``), a secure Mosquitto 2.0 (TLS, identities, ACLs; the
static files and the dynamic-security plugin), MQTT 5 shared subscriptions, a real edge agent that trains a
round, exports ONNX and spawns its workers as processes, real SDK devices pinning their edge's key, and a
test-only superuser that sees everything and injects.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from broker import topics
from broker.address import BrokerAddress
from broker.aio import make_client
from broker.runners.secure import SecureMosquitto
from broker.signing import DelegatedSigner, Signer, Verifier, load_private_key, load_public_key, unsigned
from broker.topics import Downlink, Uplink
from broker.wire import Kind, Prediction, decode_envelope, encode_envelope
from device_sdk import DeviceClient
from edge_agent.training.toy_task import ToyTask
from megace.provision.identity import Identity, Role
from megace.provision.store import Store
from megace.provision.workers import issue_workers
from tests.security.bus import ROOT_USER, collect, grant_root, publish_denied, tag, wait_for
from tests.support.edge_testkit import Device, edge_config, eventually, record, running

SITE, OTHER = "site-0", "site-1"
DEVICES = {SITE: ["d0a", "d0b"], OTHER: ["d1a"]}
W1 = Identity(Role.INFER, "e0-w1", SITE)
MARKER = "megace/v1/test/marker"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    s = Store.init(tmp_path_factory.mktemp("pki") / "bus", ["localhost"])
    for site, edge in ((SITE, "e0"), (OTHER, "e1")):
        s.add(Identity(Role.EDGE, edge, site), signing_key=True)
        for d in DEVICES[site]:
            s.add(Identity(Role.DEVICE, d, site))
    issue_workers(s, SITE, "e0", 2)
    return s


@contextlib.contextmanager
def secure_broker(store: Store, mode: str) -> Iterator[tuple[SecureMosquitto, BrokerAddress]]:
    """A secure Mosquitto from ``store`` and the test superuser's address on it."""
    password = grant_root(store.broker_dir)
    with SecureMosquitto(store, mode=mode) as b:  # type: ignore[arg-type]
        a = b.address(store.admin_username, mtls=False)
        yield b, dataclasses.replace(a, username=ROOT_USER, password=password, password_file=None)


@pytest.fixture(scope="module", params=["static", "dynsec"])
def broker(request: pytest.FixtureRequest, store: Store) -> Iterator[tuple[SecureMosquitto, BrokerAddress]]:
    with secure_broker(store, request.param) as got:
        yield got


def v5(address: Any) -> Any:
    return dataclasses.replace(address, protocol="5")


def forbidden_for_worker() -> list[str]:
    """What a worker of site-0 must never publish (written from the policy, not from the ACL rules)."""
    d0a, d1a = ("site-0", "d0a"), ("site-1", "d1a")
    return [
        *(topics.device_up(*d0a, u) for u in Uplink),  # features, register, requests, ...: devices' own
        topics.chunk(topics.device_up(*d0a, Uplink.FEATURES), 0),
        topics.adapter_up(SITE), topics.chunk(topics.adapter_up(SITE), 0),  # uploads: the edge's
        topics.global_down(), topics.site_feedback(SITE),  # the cloud's
        topics.register_request(SITE),
        *(topics.device_down(*d0a, w) for w in (Downlink.CONFIG, Downlink.MODEL, Downlink.FEEDBACK)),
        topics.chunk(topics.device_down(*d0a, Downlink.MODEL), 0),
        topics.device_down(*d1a, Downlink.PREDICTION), topics.device_down(*d1a, Downlink.ERROR),  # another site
        topics.status(topics.Role.EDGE, "e0", SITE), topics.metrics(topics.Role.EDGE, "e0", SITE),
        "megace/v1/unknown/x",
    ]


async def test_a_worker_identity_may_answer_its_sites_devices_and_nothing_else(broker: Any) -> None:
    b, root = broker
    run = tag().encode()
    got: list[tuple[str, bytes]] = []
    allowed = [topics.device_down(SITE, "d0a", Downlink.PREDICTION), topics.device_down(SITE, "d0b", Downlink.ERROR)]
    async with make_client(root, identifier="observer") as obs:
        await obs.subscribe("#", qos=1)
        task = asyncio.create_task(collect(obs, got))
        for mtls in (True, False):
            addr = b.address(W1.username, mtls=mtls)
            for t in forbidden_for_worker():
                await publish_denied(addr, t, run)
            async with make_client(addr, identifier=W1.client_id) as w:
                for t in allowed:
                    await w.publish(t, run, qos=1)
        # what it may read: its site's requests through the group, nothing of features or another site
        seen: list[tuple[str, bytes]] = []
        async with make_client(v5(b.address(W1.username, mtls=True)), identifier=W1.client_id, version="5") as w:
            mine = f"$share/megace-infer-{SITE}/megace/v1/site/{SITE}/device/+/up/infer"
            theirs = f"$share/megace-infer-{OTHER}/megace/v1/site/{OTHER}/device/+/up/infer"
            for f in (mine, theirs, f"megace/v1/site/{SITE}/device/+/up/features", "#", "megace/v1/site/+/#"):
                await w.subscribe(f, qos=1)
            reader = asyncio.create_task(collect(w, seen))
            for t in (topics.device_up(SITE, "d0a", Uplink.INFER), topics.device_up(SITE, "d0a", Uplink.FEATURES),
                      topics.device_up(OTHER, "d1a", Uplink.INFER), topics.adapter_up(SITE), topics.global_down()):
                await obs.publish(t, run, qos=1)
            await obs.publish(MARKER, run, qos=1)
            await wait_for(lambda: (MARKER, run) in got)
            await asyncio.sleep(0.5)
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    arrived = sorted(t for t, p in got if p == run and t != MARKER and t not in
                     {topics.device_up(SITE, "d0a", Uplink.INFER), topics.device_up(SITE, "d0a", Uplink.FEATURES),
                      topics.device_up(OTHER, "d1a", Uplink.INFER), topics.adapter_up(SITE), topics.global_down()})
    assert arrived == sorted(allowed * 2), "only its site's predictions and errors, on both listeners"
    # a broad filter may be granted (static ACL) but delivers only what the role may read
    assert {t for t, _ in seen} == {topics.device_up(SITE, "d0a", Uplink.INFER)}


def secure_device(store: Store, b: SecureMosquitto, site: str, name: str, edge: str, tmp: Path) -> Device:
    """The testkit's device, logging in as its identity and pinning its edge's key (verified downlinks only)."""
    dev = Device(site, name, b.address(f"megace-dev-{name}", mtls=True), tmp)
    dev.client = DeviceClient(site, name, b.address(f"megace-dev-{name}", mtls=True), on_downlink=dev._on_downlink,
                              store_path=tmp / f"{name}-secure.sqlite",
                              edge_key=store.identity_dir(f"megace-edge-{edge}") / "signing.ed25519.pub")
    return dev


async def test_secure_workers_split_requests_answers_verify_and_a_grant_is_refused_in_another_site(
    store: Store, tmp_path: Path
) -> None:
    """On the dynamic-security set-up (the stricter: it checks ``$share/...`` literally) with MQTT 5."""
    with secure_broker(store, "dynsec") as (b, root):
        await _split_verify_and_refuse(b, root, store, tmp_path)


async def _split_verify_and_refuse(b: SecureMosquitto, root: BrokerAddress, store: Store, tmp_path: Path) -> None:
    edge_addr = b.address("megace-edge-e0", mtls=True)
    edge_key = store.identity_dir("megace-edge-e0") / "signing.ed25519"
    config = edge_config(tmp_path / "state", edge_addr, {
        "site": SITE, "edge_id": "e0", "broker": edge_addr.url() + "&protocol=auto",
        "inference_workers": 2, "worker_identities": str(store.root / "identities"),
        "signing": {"key_file": str(edge_key)},
        "training": {"onnx": "on", "onnx_min_interval_s": 0.0},
    })
    task = ToyTask(config.model, seed=21)
    answers: list[tuple[str, bytes]] = []
    async with running(config, timeout=120) as agent, make_client(root, identifier="observer") as obs:
        assert agent._mqtt is not None and agent._mqtt.negotiator.version == "5"
        assert agent.counters["inference_workers_refused"] == 0 and len(agent.workers.procs) == 2
        assert agent.counters["subscribe_refused"] == 0  # dynsec granted the edge its $share group too
        await obs.subscribe(f"megace/v1/site/{SITE}/device/+/down/prediction", qos=1)
        watcher = asyncio.create_task(collect(obs, answers))
        devices = [await secure_device(store, b, SITE, d, "e0", tmp_path).start() for d in DEVICES[SITE]]
        stranger = await secure_device(store, b, OTHER, "d1a", "e1", tmp_path).start(register=False)
        try:
            await eventually(lambda: all(d.received(Kind.CONFIG) for d in devices), 60, "signed configs")
            await devices[0].publish([record("d0a", i, s) for i, s in enumerate(task.samples(40))])
            await eventually(lambda: agent.model_artifact is not None, 120, "the edge's first export")
            logs = [agent.workers.log_path(f"e0-w{n}") for n in (1, 2)]
            await eventually(lambda: all(p.exists() and "joined group" in p.read_text() for p in logs), 120,
                             "both workers in the group")
            samples = ToyTask(config.model, seed=22).samples(90)
            sent = set()
            for i, s in enumerate(samples):
                dev = devices[i % 2]
                await dev.infer(record(dev.id, 1000 + i, {"modalities": s["modalities"]}, label=False))
                sent.add((dev.id, 1000 + i))

            def delivered() -> list[tuple[str, int]]:
                return [(d.id, p.sample) for d in devices for p in d.received(Kind.PREDICTION) if p.sample >= 1000]

            await eventually(lambda: len(delivered()) >= len(sent), 90, "90 verified answers on the devices")
            await asyncio.sleep(1.0)  # a duplicate would arrive now
            assert sorted(delivered()) == sorted(sent), "each request answered once, every answer verified"
            for d in devices:
                assert not [k for k in d.client.counters.snapshot() if k.startswith("rejected.")], d.id
            edge_pub = load_public_key(store.identity_dir("megace-edge-e0") / "signing.ed25519.pub")
            by_sender: dict[str, int] = {}
            for _t, payload in list(answers):
                env = decode_envelope(unsigned(payload))
                p = Prediction.from_body(env.body)
                if p.sample < 1000:
                    continue
                by_sender[env.sender] = by_sender.get(env.sender, 0) + 1
                # the edge signs with its key (0x84), a worker with its own key plus the edge's grant (0x85)
                assert payload[0] == (0x84 if env.sender == "e0" else 0x85), env.sender
                assert Verifier([edge_pub]).open(payload) == unsigned(payload)
            assert set(by_sender) == {"e0", "e0-w1", "e0-w2"} and sum(by_sender.values()) == len(sent), by_sender

            # a worker of site-0 signs a prediction for a device of site-1: refused there, typed and counted
            w1 = store.identity_dir(W1.username)
            forged = DelegatedSigner(load_private_key(w1 / "signing.ed25519"), (w1 / "grant.msgpack").read_bytes())
            body = Prediction("d1a", 5, 1, np.array([0.1, 0.9], np.float32), 1).to_body()
            e1 = Signer(load_private_key(store.identity_dir("megace-edge-e1") / "signing.ed25519"))
            target = topics.device_down(OTHER, "d1a", Downlink.PREDICTION)
            await obs.publish(target, forged.sign(encode_envelope(Kind.PREDICTION, "e0-w1", 10**6, body)), qos=1)
            await eventually(lambda: stranger.client.counters["rejected.UnknownKeyError"] == 1, 30, "the refusal")
            await obs.publish(target, e1.sign(encode_envelope(Kind.PREDICTION, "e1", 10**6 + 1, body)), qos=1)
            await eventually(lambda: stranger.received(Kind.PREDICTION), 30, "its own edge's prediction")
            assert [p.sample for p in stranger.received(Kind.PREDICTION)] == [5]
            assert stranger.client.counters["rejected.UnknownKeyError"] == 1
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            for d in [*devices, stranger]:
                await d.close()


async def test_an_edge_whose_shared_group_the_broker_refuses_counts_and_says_so(
    store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """dynsec checks ``$share/<group>/...`` literally and grants the default group only: an edge configured with
    another group is refused that subscription (its requests would be lost), and must not stay silent."""
    with secure_broker(store, "dynsec") as (b, _root):
        edge_addr = b.address("megace-edge-e0", mtls=True)
        config = edge_config(tmp_path / "state", edge_addr, {
            "site": SITE, "edge_id": "e0", "broker": edge_addr.url() + "&protocol=5", "infer_group": "elsewhere",
            "shared_inference": True})
        async with running(config, timeout=60) as agent:
            await eventually(lambda: agent.counters["subscribe_refused"] == 1, 30, "the refusal counted")
        assert "refused the subscription(s) $share/elsewhere/megace/v1/site/site-0/device/+/up/infer" in caplog.text
