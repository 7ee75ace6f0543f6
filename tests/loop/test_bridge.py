"""Two sites, each on its own Mosquitto bridged to the cloud's, from the committed ``deploy/mosquitto/bridge-*``.

Three Mosquittos rendered from ``bridge-site.conf`` (twice) and ``bridge-cloud.conf`` + ``bridge-cloud.acl``
with loopback ports and a throwaway CA (``megace.provision.pki``): the bridges log in to the cloud broker with
mutual TLS, a certificate per site. Each site runs a real edge process and a real SDK device, both devices
called ``gw-1``; the cloud aggregator and a dashboard-like observer use the cloud broker only. The loop
must complete through the bridges: both sites' uploads reach the cloud, the globals and each site's own
feedback come back, the dashboards on the cloud broker see the two ``gw-1`` apart, retained flags
survive, device traffic never leaves its site, and a site's bridge identity cannot publish as another site.
"""

from __future__ import annotations

import json
import os
import pwd
import string
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from broker import topics
from broker.address import BrokerAddress
from broker.runners import free_port
from broker.runners.process import MosquittoProcess
from broker.wire import Kind
from cloud_aggregator.config import load_cloud_config, write_cloud_config
from device_sdk import DeviceClient
from edge_agent.training.toy_task import ToyTask
from megace.provision.pki import CertificateAuthority, save_pair
from tests.reliability.system_kill import Service
from tests.support.edge_testkit import edge_config, record, toy_profile

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto"
SITES = ("site-a", "site-b")
DEVICE = "gw-1"  # the same id at both sites
CLOUD_ID = "cloud-bridged"

pytestmark = pytest.mark.timeout(300)


def render(template: Path, values: dict[str, Any]) -> str:
    """What ``envsubst`` makes of the template (``${VAR}``); a variable left unset is an error here."""
    text = string.Template(template.read_text()).substitute({k: str(v) for k, v in values.items()})
    # as root, Mosquitto would switch to user ``mosquitto``, which cannot read the test's 0600 keys
    return text + f"\nuser {pwd.getpwuid(os.geteuid()).pw_name}\n"


class RenderedBroker(MosquittoProcess):
    """A Mosquitto running a rendered deploy template; ``ports`` are the listeners it must open."""

    def __init__(self, state_dir: Path, text: str, ports: list[int]) -> None:
        super().__init__(state_dir, prefix="megace-bridge-")
        self.text, self.ports = text, ports

    def start(self) -> RenderedBroker:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.text)
        self._launch("127.0.0.1", self.ports, "mosquitto")
        return self


class Observer:
    """A plain subscriber: every (topic, payload, retain) it got, in order."""

    def __init__(self, port: int, filters: list[str], *, tls: dict[str, Path] | None = None) -> None:
        self.got: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"obs-{uuid.uuid4().hex[:8]}",
                             protocol=mqtt.MQTTv311)
        if tls:
            self.c.tls_set(ca_certs=str(tls["ca"]), certfile=str(tls["cert"]), keyfile=str(tls["key"]))
        self.c.on_connect = lambda c, *a: c.subscribe([(f, 1) for f in filters]) if filters else self._ready.set()
        self.c.on_subscribe = lambda *a: self._ready.set()
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        assert self._ready.wait(20), "observer never ready"

    def _on_message(self, _c: mqtt.Client, _u: Any, m: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.got.append((m.topic, bytes(m.payload), bool(m.retain)))

    def seen(self) -> list[tuple[str, bytes, bool]]:
        with self._lock:
            return list(self.got)

    def latest_json(self, topic: str) -> dict[str, Any]:
        docs = [p for t, p, _ in self.seen() if t == topic and p]
        return json.loads(docs[-1]) if docs else {}

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def until(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


@dataclass
class Bridged:
    cloud_port: int
    bridge_port: int
    site_ports: dict[str, int]
    pki: dict[str, dict[str, Path]]
    tap: Observer  # on the cloud broker: status, metrics, events, uploads and anything under site/
    feedback: dict[str, list[Any]]  # site -> FEEDBACK downlinks its gw-1 got
    edges: dict[str, Service]
    cloud: Service


def make_pki(folder: Path) -> dict[str, dict[str, Path]]:
    """A CA, the cloud broker's server certificate (for 127.0.0.1) and one client certificate per site."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = CertificateAuthority.create("megace bridge test CA", days=2)
    ca.save(folder)
    out: dict[str, dict[str, Path]] = {}
    for name, servers in (("server", ["127.0.0.1"]), *((s, []) for s in SITES)):
        key, cert = save_pair(folder, name, *ca.issue(name, server_names=servers, days=2))
        out[name] = {"ca": folder / "ca.crt", "cert": cert, "key": key}
    return out


@pytest.fixture(scope="module")
def bridged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bridged]:
    root = tmp_path_factory.mktemp("bridge")
    pki = make_pki(root / "pki")
    cloud_port, bridge_port = free_port(), free_port()
    brokers = [RenderedBroker(root / "cloud-broker", render(DEPLOY / "bridge-cloud.conf", {
        "STATE_DIR": root / "cloud-broker", "BRIDGE_LISTEN_PORT": bridge_port, "BRIDGE_LISTEN_ADDRESS": "127.0.0.1",
        "LOCAL_LISTEN_PORT": cloud_port, "BRIDGE_CA": pki["server"]["ca"], "BRIDGE_SERVER_CERT": pki["server"]["cert"],
        "BRIDGE_SERVER_KEY": pki["server"]["key"], "BRIDGE_ACL": DEPLOY / "bridge-cloud.acl"}),
        [cloud_port, bridge_port])]
    site_ports = {s: free_port() for s in SITES}
    for s in SITES:
        brokers.append(RenderedBroker(root / f"{s}-broker", render(DEPLOY / "bridge-site.conf", {
            "SITE": s, "STATE_DIR": root / f"{s}-broker", "SITE_LISTEN_PORT": site_ports[s],
            "SITE_LISTEN_ADDRESS": "127.0.0.1", "CLOUD_ADDRESS": f"127.0.0.1:{bridge_port}",
            "BRIDGE_CA": pki[s]["ca"], "BRIDGE_CERT": pki[s]["cert"], "BRIDGE_KEY": pki[s]["key"]}),
            [site_ports[s]]))
    started: list[Any] = []
    try:
        for b in brokers:
            started.append(b.start())
        tap = Observer(cloud_port, ["megace/v1/status/#", "megace/v1/metrics/#", "megace/v1/events/#",
                                    "megace/v1/cloud/up/#", "megace/v1/site/#"])
        started.append(tap)
        edge_cfgs = {s: edge_config(root / f"edge-{s}", BrokerAddress("127.0.0.1", site_ports[s]), {
            "site": s, "edge_id": f"edge-{s}", "log_level": "WARNING",
            "training": {"min_new_samples": 40, "interval_s": 3600.0, "steps": 4, "batch_size": 16}})
            for s in SITES}
        cloud_cfg = load_cloud_config(None, {
            "cloud_id": CLOUD_ID, "broker": f"mqtt://127.0.0.1:{cloud_port}", "state_dir": str(root / "cloud"),
            "model": edge_cfgs[SITES[0]].model.to_dict(),
            "aggregation": {"strategy": "fedavg", "buffer_k": len(SITES), "buffer_period_s": 60.0},
            "limits": {"metrics_period_s": 0.5, "torch_threads": 1}}, environ={})
        cloud = Service(CLOUD_ID, "cloud_aggregator", write_cloud_config(cloud_cfg, root / "cloud.toml"),
                        root / "cloud.log").start()
        started.append(cloud)
        edges = {s: Service(c.edge_id, "edge_agent", c.write(root / f"edge-{s}.toml"), root / f"edge-{s}.log").start()
                 for s, c in edge_cfgs.items()}
        started.extend(edges.values())
        # the edges' metrics reach the cloud broker only through their bridges: both bridges are up
        until(lambda: all(tap.latest_json(topics.metrics(topics.Role.EDGE, f"edge-{s}", s)) for s in SITES), 120,
              "both edges' metrics on the cloud broker")
        feedback: dict[str, list[Any]] = {s: [] for s in SITES}
        task = ToyTask(edge_cfgs[SITES[0]].model, seed=7)
        for s in SITES:
            dev = DeviceClient(s, DEVICE, BrokerAddress("127.0.0.1", site_ports[s]), store_path=root / f"{s}.sqlite",
                               on_downlink=lambda k, m, s=s: feedback[s].append(m) if k is Kind.FEEDBACK else None)
            started.append(dev)
            assert dev.connect(30)
            dev.register(toy_profile(DEVICE))
            for i in range(60):  # more than one round's worth (40) of labelled records
                dev.publish(record(DEVICE, i, task.sample()))
            assert dev.flush(60)
        yield Bridged(cloud_port, bridge_port, site_ports, pki, tap, feedback, edges, cloud)
    finally:
        for thing in reversed(started):
            if isinstance(thing, Service):
                thing.terminate(30)
            elif isinstance(thing, DeviceClient):
                thing.close(5)
            else:
                thing.close()


def edge_metrics(b: Bridged, site: str) -> dict[str, Any]:
    return b.tap.latest_json(topics.metrics(topics.Role.EDGE, f"edge-{site}", site)).get("metrics", {})


def wait_for_a_round_trip(bridged: Bridged) -> None:
    """Both sites' uploads aggregated, the global applied on both edges and feedback at both devices (each test
    waits for it itself: ``./dev.sh test`` keeps a file's tests together, but not every run does)."""
    cloud_topic = topics.metrics(topics.Role.CLOUD, CLOUD_ID)
    # both sites' uploads crossed their bridges; the cloud aggregated them (buffer of 2: it needs both)
    until(lambda: int(bridged.tap.latest_json(cloud_topic).get("metrics", {}).get("accepted", 0)) >= 2, 180,
          "the cloud to accept an upload from each site")
    ups = {t for t, _, _ in bridged.tap.seen() if t.startswith("megace/v1/cloud/up/")}
    assert {topics.parse(t).site for t in ups} == set(SITES), ups
    # the global came back down both bridges and each edge applied it (seen in metrics that came up again)
    until(lambda: all(int(edge_metrics(bridged, s).get("globals_applied", 0)) >= 1 for s in SITES), 180,
          "both edges to apply a global")
    # each site's feedback reached its own gw-1 (the two devices share the id; the site routes it)
    until(lambda: all(bridged.feedback[s] for s in SITES), 120, "both sites' devices to get feedback")


def test_the_loop_completes_through_the_bridges(bridged: Bridged) -> None:
    wait_for_a_round_trip(bridged)
    assert all(bridged.edges[s].tracebacks() == 0 for s in SITES) and bridged.cloud.tracebacks() == 0


def test_dashboards_on_the_cloud_broker_see_both_gw_1_apart_with_retained_flags(bridged: Bridged) -> None:
    wanted = {s: topics.status(topics.Role.DEVICE, DEVICE, s) for s in SITES}
    until(lambda: all(bridged.tap.latest_json(t) for t in wanted.values()), 60, "both devices' status")
    late = Observer(bridged.cloud_port, ["megace/v1/status/device/#"])  # a dashboard opened now
    try:
        until(lambda: {t for t, _, _ in late.seen()} >= set(wanted.values()), 30, "the retained statuses")
        for s, topic in wanted.items():
            got = [(p, r) for t, p, r in late.seen() if t == topic]
            assert got and all(r for _, r in got), (topic, got)  # retained on the cloud broker, via the bridge
            doc = json.loads(got[-1][0])
            assert doc["id"] == DEVICE and doc["detail"]["site"] == s and doc["state"] == "online", doc
    finally:
        late.close()


def test_globals_and_only_their_own_feedback_are_retained_on_each_site_broker(bridged: Bridged) -> None:
    wait_for_a_round_trip(bridged)
    for s in SITES:
        late = Observer(bridged.site_ports[s], [*topics.subscriptions(topics.global_down()),
                                                "megace/v1/cloud/down/site/#"])
        try:
            until(lambda late=late: any(t == topics.global_down() for t, _, _ in late.seen()), 30, f"{s}'s global")
            time.sleep(1.0)
            got = late.seen()
            assert got and all(r for _, _, r in got), got  # every one retained on the site broker
            feedback_sites = {topics.parse(t).site for t, _, _ in got if "/down/site/" in t}
            assert feedback_sites == {s}, (s, feedback_sites)  # never another site's feedback
        finally:
            late.close()


def test_device_traffic_never_leaves_its_site(bridged: Bridged) -> None:
    until(lambda: all(int(edge_metrics(bridged, s).get("samples_total", 0)) >= 60 for s in SITES), 120,
          "both edges to ingest their devices' records")
    assert not [t for t, _, _ in bridged.tap.seen() if t.startswith("megace/v1/site/")]


def test_a_site_bridge_identity_cannot_publish_as_another_site(bridged: Bridged) -> None:
    watch = Observer(bridged.cloud_port, ["megace/v1/cloud/up/+/adapter/probe", "megace/v1/status/device/+/impostor"])
    pub = Observer(bridged.bridge_port, [], tls=bridged.pki["site-a"])  # logs in as site-a's bridge
    try:
        for t in ("megace/v1/cloud/up/site-b/adapter/probe", "megace/v1/status/device/site-b/impostor",
                  "megace/v1/cloud/up/site-a/adapter/probe"):
            pub.c.publish(t, b"x", qos=1).wait_for_publish(10)
        until(lambda: watch.seen(), 20, "the allowed publish")
        time.sleep(1.0)
        assert [t for t, _, _ in watch.seen()] == ["megace/v1/cloud/up/site-a/adapter/probe"]
    finally:
        pub.close()
        watch.close()
