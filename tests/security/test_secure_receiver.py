"""The edge's receiver process in megace's secure set-up: the receiver logs in as the edge, the agent as its
control identity (role ``control``, ``megace-ctl-<edge_id>``), so neither takes the other's session.

Real parts: a provisioned folder, a secure Mosquitto 2.0 (mutual TLS, the static ACL files), a real edge agent
with its receiver process, a real SDK device pinning the edge's key. The contrast case gives the agent the
edge's own login, which is what ``ingest_receiver = "auto"`` refuses to do: the broker makes the username the
client id, and the two connections keep throwing each other off.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import aiomqtt
import pytest

from broker import topics
from broker.address import BrokerAddress
from broker.aio import make_client
from broker.runners.secure import SecureMosquitto
from broker.wire import Kind, Status
from device_sdk import DeviceClient
from edge_agent.config import EdgeConfig, EdgeConfigError
from edge_agent.service import EdgeAgent
from edge_agent.training.toy_task import ToyTask
from megace.provision.identity import Identity, Role
from megace.provision.store import Store
from tests.security.bus import ROOT_USER, grant_root
from tests.support.edge_testkit import Device, edge_config, eventually, record, running

pytestmark = pytest.mark.timeout(300)

SITE, EDGE, DEVICE = "site-0", "e0", "d0a"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    s = Store.init(tmp_path_factory.mktemp("pki") / "bus", ["localhost"])
    s.add(Identity(Role.EDGE, EDGE, SITE), signing_key=True)
    s.add(Identity(Role.CONTROL, EDGE, SITE))
    s.add(Identity(Role.DEVICE, DEVICE, SITE))
    return s


def _folder(store: Store, username: str) -> str:
    return str(store.identity_dir(username))


def _config(tmp: Path, edge_url: str, **extra: object) -> EdgeConfig:
    return edge_config(tmp / "state", BrokerAddress(), {"site": SITE, "edge_id": EDGE, "broker": edge_url, **extra})


def test_auto_runs_a_receiver_process_only_where_the_agent_has_a_login_of_its_own(store: Store, tmp_path: Path
                                                                                 ) -> None:
    mtls = store.address("megace-edge-e0", mtls=True)
    password = store.address("megace-edge-e0", mtls=False)
    anonymous = _config(tmp_path, "mqtt://127.0.0.1:1883")
    assert anonymous.receiver_process and anonymous.control_address == anonymous.address
    alone = _config(tmp_path, mtls.url())  # an identity and no second login: inline, one connection
    assert not alone.receiver_process and alone.control_address == alone.address
    with pytest.raises(EdgeConfigError, match="control_identity"):
        _config(tmp_path, mtls.url(), ingest_receiver="process")
    control = _folder(store, "megace-ctl-e0")
    for edge in (mtls, password):
        cfg = _config(tmp_path, edge.url(), control_identity=control)
        ctl = cfg.control_address
        assert cfg.receiver_process and cfg.address.username == "megace-edge-e0"
        assert ctl.username == "megace-ctl-e0" and (ctl.host, ctl.port, ctl.ca_file) == (edge.host, edge.port,
                                                                                         edge.ca_file)
        if edge.cert_file:  # the edge's listener decides how the control identity logs in
            assert ctl.cert_file == str(Path(control) / "client.crt") and ctl.password is None
        else:
            assert ctl.cert_file is None
            assert ctl.password == (Path(control) / "password").read_text().strip()
    assert not _config(tmp_path, mtls.url(), ingest_receiver="inline", control_identity=control).receiver_process
    with pytest.raises(EdgeConfigError, match="control_identity"):
        _config(tmp_path, mtls.url(), control_identity=str(tmp_path / "missing"))


async def _serve(store: Store, b: SecureMosquitto, tmp: Path, control: str, *, strict: bool = True
                 ) -> dict[str, float]:
    """Run the edge with ``control`` as its agent's login for a device's records and a request; its counters.
    ``strict``: the records and the answer must arrive (else the run just lasts as long)."""
    edge = b.address("megace-edge-e0", mtls=True)
    config = _config(tmp, edge.url(), control_identity=control, ingest_receiver="process",
                     signing={"key_file": str(store.identity_dir("megace-edge-e0") / "signing.ed25519")},
                     training={"min_new_samples": 10**9})
    task = ToyTask(config.model, seed=3)
    addr = b.address(f"megace-dev-{DEVICE}", mtls=True)
    dev = Device(SITE, DEVICE, addr, tmp)
    dev.client = DeviceClient(SITE, DEVICE, addr, on_downlink=dev._on_downlink, store_path=tmp / "dev.sqlite",
                              edge_key=store.identity_dir("megace-edge-e0") / "signing.ed25519.pub")
    async with running(config, timeout=90) as agent:
        await dev.start()
        try:
            await dev.publish([record(DEVICE, i, s) for i, s in enumerate(task.samples(30))])
            if strict:
                await eventually(lambda: agent.counters["samples_total"] >= 30, 60, "30 records through the receiver")
            await dev.infer(record(DEVICE, 500, {"modalities": task.samples(1)[0]["modalities"]}, label=False))
            if strict:
                await eventually(lambda: [p for p in dev.received(Kind.PREDICTION) if p.sample == 500], 60,
                                 "a signed prediction")
            await asyncio.sleep(3.0 if strict else 8.0)  # a session taken over shows up as disconnects by then
            return {**agent.counters.snapshot()}
        finally:
            await dev.close()


async def test_the_receiver_and_the_agent_keep_their_sessions_on_a_secure_broker(store: Store, tmp_path: Path
                                                                                ) -> None:
    with SecureMosquitto(store, mode="static") as b:
        counters = await _serve(store, b, tmp_path / "own", _folder(store, "megace-ctl-e0"))
        assert counters["samples_total"] == 30 and counters.get("rejected", 0) == 0
        assert counters["connects"] == 1 and counters.get("disconnects", 0) == 0, counters  # the agent's session
        assert counters["receiver_connects"] == 1 and counters.get("receiver_disconnects", 0) == 0, counters


async def test_one_login_for_both_connections_has_each_take_the_others_session(store: Store, tmp_path: Path
                                                                               ) -> None:
    """Why the control identity exists: the agent logging in as the edge, beside its receiver, is thrown off
    (or throws the receiver off) again and again."""
    with SecureMosquitto(store, mode="static") as b:
        edge_folder = Path(_folder(store, "megace-edge-e0"))
        same = tmp_path / "megace-edge-e0"  # the edge's own files, under the edge's own name
        same.mkdir()
        for name in ("client.crt", "client.key", "ca.crt", "password"):
            (same / name).write_bytes((edge_folder / name).read_bytes())
        counters = await _serve(store, b, tmp_path / "same", str(same), strict=False)
        lost = counters.get("disconnects", 0) + counters.get("receiver_disconnects", 0)
        assert lost >= 2, counters


def test_the_control_identity_is_named_for_its_edge_and_signs_nothing() -> None:
    ident = Identity(Role.CONTROL, EDGE, SITE)
    assert ident.username == ident.client_id == "megace-ctl-e0"
    assert Identity.from_username("megace-ctl-e0", SITE) == ident
    with pytest.raises(ValueError):
        Identity(Role.CONTROL, EDGE)  # bound to a site, as its edge
    assert dataclasses.asdict(ident)["site"] == SITE


async def test_the_edge_is_not_online_before_its_receiver_is_subscribed(store: Store, tmp_path: Path) -> None:
    """``online`` tells devices and launchers that their data has a subscriber. Here the receiver's login (the
    edge's) is refused while the agent's own (its control identity) is accepted: the agent connects, and its
    status stays unpublished; records sent on an earlier ``online`` would have gone to no one."""
    password = grant_root(store.broker_dir)
    try:
        with SecureMosquitto(store, mode="static") as b:
            edge = b.address("megace-edge-e0", mtls=False)
            wrong = dataclasses.replace(edge, password="not-the-edge-password", password_file=None)
            config = _config(tmp_path, wrong.url(with_password=True), control_identity=_folder(store, "megace-ctl-e0"))
            root = dataclasses.replace(b.address(store.admin_username, mtls=False), username=ROOT_USER,
                                       password=password, password_file=None)
            states: list[str] = []
            agent = EdgeAgent(config)
            stop = asyncio.Event()
            async with make_client(root, identifier="status-tap") as tap:
                await tap.subscribe(topics.status(topics.Role.EDGE, EDGE, SITE), qos=1)
                reader = asyncio.create_task(_statuses(tap, states))
                task = asyncio.create_task(agent.run(stop))
                try:
                    await eventually(lambda: agent.counters["connects"] >= 1, 90, "the agent's own connection")
                    await eventually(lambda: agent.counters["receiver_connect_failures"] >= 2, 30,
                                     "the receiver refused")
                    await asyncio.sleep(1.0)
                    assert "online" not in states and not agent.ready.is_set(), states
                finally:
                    stop.set()
                    await asyncio.wait_for(task, 60)
                    reader.cancel()
                    await asyncio.gather(reader, return_exceptions=True)
    finally:
        store.write_broker_files()  # drop the superuser again


async def _statuses(client: aiomqtt.Client, into: list[str]) -> None:
    async for message in client.messages:
        if message.payload:
            into.append(Status.decode(bytes(message.payload)).state)  # type: ignore[arg-type]
