"""The dashboard page on the secured bus: headless Chromium logs in over ``wss://`` as the read-only ``dashboard``
identity of a provisioned PKI, shows the device and edge that published their status with their own certificates,
and cannot publish (its own MQTT client's publishes never reach a privileged subscriber); a wrong password is
refused and the page says so.

The browser context has ``ignore_https_errors``: the broker's certificate comes from the test's throw-away CA,
which headless Chromium does not trust, and importing a CA into Chromium needs an NSS database (``certutil``) in a
profile. The test is about the broker's login and ACL, which TLS verification does not change; Python's clients
here verify the same certificate against the CA in full.

That the dashboard identity cannot publish over the TLS MQTT listeners (client certificate and password, static
and dynamic-security set-ups, every kind of topic) is ``tests/security/test_acl_matrix.py::test_publish_matrix``.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from broker import topics
from broker.address import BrokerAddress
from broker.runners.secure import SecureMosquitto
from broker.wire.status import Status
from device_sdk import DeviceClient
from megace.dashboard.server import DashboardServer
from megace.provision import Identity, Role
from megace.provision.store import Store
from tests.dashboard.fleetkit import CHROMIUM_ARGS

SITE = "site-s"
EDGE = Identity(Role.EDGE, "edge-s", SITE)
DEVICE = Identity(Role.DEVICE, "dev-s", SITE)
DASH = Identity(Role.DASHBOARD, "ops")
WATCHER = Identity(Role.MONITOR, "watch")  # reads all of megace/v1/#: sees anything that gets through
EDGE_STATUS = topics.status(topics.Role.EDGE, EDGE.name, SITE)
ONLINE = ("(s => s.sites['site-s'] && s.sites['site-s'].edges['edge-s'] && "
          "s.sites['site-s'].edges['edge-s'].state === 'online' && "
          "s.sites['site-s'].devices['dev-s'] === 'online')(window.megace.summary())")


class Watcher:
    """A paho subscriber to ``megace/v1/#`` with a privileged (monitor) identity over the TLS password listener."""

    def __init__(self, addr: BrokerAddress) -> None:
        self.got: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        ready = threading.Event()
        self.client = _paho(addr, f"{WATCHER.username}")
        self.client.on_connect = lambda c, *_: c.subscribe(f"{topics.ROOT}/#", 1)
        self.client.on_subscribe = lambda *_: ready.set()
        self.client.on_message = self._on_message
        self.client.connect(addr.host, addr.port)
        self.client.loop_start()
        assert ready.wait(10), "the watcher never subscribed"

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.got.append((msg.topic, bytes(msg.payload)))

    def payloads_with(self, marker: str) -> list[tuple[str, bytes]]:
        with self._lock:
            return [(t, p) for t, p in self.got if marker.encode() in p]

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class SecureFleet:
    store: Store
    broker: SecureMosquitto
    page_url: str
    watcher: Watcher
    context: Any  # a Playwright browser context with ignore_https_errors (the test CA)
    page_errors: list[str] = field(default_factory=list)

    def password(self, ident: Identity) -> str:
        return (self.store.identity_dir(ident.username) / "password").read_text().strip()


def _paho(addr: BrokerAddress, client_id: str) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    if addr.username:
        c.username_pw_set(addr.username, addr.password)
    c.tls_set_context(addr.ssl_context())
    return c


def _until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.fixture(scope="module")
def secure_fleet(tmp_path_factory: pytest.TempPathFactory, playwright: Any) -> Iterator[SecureFleet]:
    """A provisioned PKI, the secure Mosquitto with its wss:// listener, an edge and a real SDK device online (each
    with its own certificate), a privileged watcher, the page server and a browser."""
    pw = playwright  # the package's one Playwright (conftest.py): a second sync_playwright() cannot start
    tmp = tmp_path_factory.mktemp("secure-dash")
    store = Store.init(tmp / "pki", ["127.0.0.1"])
    store.add(EDGE)  # a certificate and a password: the control below publishes as the edge over wss://
    store.add(DEVICE, password=False)
    store.add(DASH, cert=False)
    store.add(WATCHER, cert=False)
    with SecureMosquitto(store, ws_port=0) as broker, DashboardServer() as server:
        watcher = Watcher(broker.address(WATCHER.username, mtls=False))
        edge = _paho(broker.address(EDGE.username), EDGE.username)
        edge.will_set(EDGE_STATUS, Status("edge", EDGE.name, "offline", detail={"site": SITE}).encode(), 1, True)
        edge.connect(broker.host, broker.mtls_port)
        edge.loop_start()
        device = DeviceClient(SITE, DEVICE.name, broker.address(DEVICE.username), store_path=tmp / "q.sqlite")
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            online = Status("edge", EDGE.name, "online", detail={"site": SITE}).encode()
            edge.publish(EDGE_STATUS, online, qos=1, retain=True).wait_for_publish(10)
            assert device.connect(10), "the device could not connect with its certificate"
            _until(lambda: any(t == EDGE_STATUS for t, _ in watcher.got), 10, "the edge's status never arrived")
            context = browser.new_context(ignore_https_errors=True, viewport={"width": 1200, "height": 800})
            assert broker.ws_url and broker.ws_url.startswith("wss://127.0.0.1:")
            yield SecureFleet(store, broker, server.url(broker.ws_url, DASH.username), watcher, context)
        finally:
            browser.close()
            device.close(5)
            edge.disconnect()
            edge.loop_stop()
            watcher.stop()


def _login(fleet: SecureFleet, password: str) -> Any:
    page = fleet.context.new_page()
    page.on("pageerror", lambda exc: fleet.page_errors.append(str(exc)))
    page.goto(fleet.page_url)
    assert page.input_value("#user") == DASH.username and page.input_value("#url") == fleet.broker.ws_url
    page.fill("#password", password)
    page.click("#connect button[type=submit]")
    return page


def test_the_dashboard_logs_in_over_wss_shows_the_fleet_and_cannot_publish(secure_fleet: SecureFleet) -> None:
    fleet = secure_fleet
    page = _login(fleet, fleet.password(DASH))
    try:
        page.wait_for_function("window.megace.state.connected", timeout=20_000)
        page.wait_for_function(ONLINE, timeout=20_000)
        page.wait_for_function("document.getElementById('conn').textContent === 'connected'", timeout=5_000)
        # the state is there; the tree is drawn from it on the page's next render (late in a loaded full run)
        page.wait_for_function(f"(t => t.includes('{EDGE.name}') && t.includes('{DEVICE.name}'))"
                               "(document.getElementById('tree').textContent)", timeout=10_000)
        tree = page.inner_text("#tree")
        assert EDGE.name in tree and DEVICE.name in tree
        assert page.evaluate("window.megace.client.options.username") == DASH.username
        # the page's own client publishes: a forged offline status and a metrics document, retained, QoS 0 and 1
        marker = f"forged-{uuid.uuid4().hex[:8]}"
        forged = [(EDGE_STATUS, 1), (topics.metrics(topics.Role.EDGE, EDGE.name, SITE), 0),
                  (topics.status(topics.Role.DEVICE, DEVICE.name, SITE), 1)]
        for topic, qos in forged:
            page.wait_for_function("window.megace.client.connected", timeout=10_000)
            doc = json.dumps({"v": 1, "role": "edge", "id": EDGE.name, "state": "offline", "ts": time.time(),
                              "detail": {"site": SITE, "marker": marker}})
            page.evaluate("([t, p, q]) => window.megace.client.publish(t, p, {qos: q, retain: true})",
                          [topic, doc, qos])
        time.sleep(4)
        assert fleet.watcher.payloads_with(marker) == [], "a read-only dashboard's publish reached a subscriber"
        page.wait_for_function("window.megace.state.connected", timeout=20_000)  # the page reconnects
        assert page.evaluate(ONLINE), "the forged status changed what the page shows"
        # control: the same browser MQTT library over the same wss:// listener, as an identity allowed to publish
        control = f"control-{uuid.uuid4().hex[:8]}"
        page.evaluate("""([url, user, pw, topic, payload]) => new Promise((ok, fail) => {
            const c = window.mqtt.connect(url, {username: user, password: pw, clientId: user, reconnectPeriod: 0});
            c.on('connect', () => c.publish(topic, payload, {qos: 1}, (e) => { c.end(); e ? fail(e) : ok(); }));
            c.on('error', fail);
        })""", [fleet.broker.ws_url, EDGE.username, fleet.password(EDGE),
                topics.metrics(topics.Role.EDGE, EDGE.name, SITE), control])
        _until(lambda: fleet.watcher.payloads_with(control), 10, "the control publish never arrived")
        assert fleet.page_errors == []
    finally:
        page.close()


def test_a_wrong_password_is_refused_and_the_page_says_so(secure_fleet: SecureFleet) -> None:
    page = _login(secure_fleet, "not-" + secure_fleet.password(DASH))
    try:
        page.wait_for_function("window.megace.state.lastError", timeout=20_000)
        assert "Not authorized" in page.evaluate("window.megace.state.lastError")
        page.wait_for_function("document.getElementById('conn').textContent.includes('Not authorized')",
                               timeout=5_000)
        time.sleep(2)  # a retry with the same password is refused again
        assert page.evaluate("window.megace.state.connected") is False
        assert page.evaluate("window.megace.state.messages") == 0
        assert EDGE.name not in page.inner_text("#tree")
    finally:
        page.close()


def _ws_connect(fleet: SecureFleet, *, tls: bool, user: str | None, password: str | None) -> str:
    """Connect with paho over WebSockets to the dashboard listener: the CONNACK's reason, or the error."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"probe-{uuid.uuid4().hex[:6]}",
                    transport="websockets", protocol=mqtt.MQTTv311)
    if tls:
        c.tls_set(ca_certs=str(fleet.store.broker_dir / "ca.crt"))
    if user:
        c.username_pw_set(user, password)
    result: list[str] = []
    done = threading.Event()
    c.on_connect = lambda _c, _u, _f, rc, _p=None: (result.append(str(rc)), done.set())
    c.on_disconnect = lambda _c, _u, _f, rc, _p=None: (result.append(f"disconnected: {rc}"), done.set())
    try:
        c.connect(fleet.broker.host, int(fleet.broker.ws_port or 0), keepalive=10)
    except OSError as exc:
        return f"error: {exc}"
    c.loop_start()
    try:
        done.wait(10)
    finally:
        c.disconnect()
        c.loop_stop()
    return result[0] if result else "no answer"


def test_the_wss_listener_wants_tls_and_a_password(secure_fleet: SecureFleet) -> None:
    """Outside the browser: the listener speaks only TLS, refuses anonymous clients, takes the dashboard's password
    (verified against the PKI's CA: the certificate is the provisioned server's)."""
    fleet = secure_fleet
    assert _ws_connect(fleet, tls=True, user=DASH.username, password=fleet.password(DASH)) == "Success"
    assert _ws_connect(fleet, tls=True, user=None, password=None) == "Not authorized"
    assert _ws_connect(fleet, tls=False, user=DASH.username, password=fleet.password(DASH)) != "Success"
