"""The dashboard page in headless Chromium (Debian's ``chromium``, driven by Playwright) on the broker's
WebSockets listener: it watched the whole closed loop, so it must list the run's sites, edges and devices,
have gained one chart point per round, count foreign and malformed messages without breaking, and turn a
real edge process killed with SIGKILL offline from its last will within its keep-alive."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from broker import topics
from megace.loop.configs import CLOUD_ID
from tests.dashboard.fleetkit import ARTIFACTS, DEVICES_PER_EDGE, EDGES, ROUNDS, Fleet, device, site
from tests.support.edge_testkit import edge_config

REPO = Path(__file__).resolve().parents[2]


def _summary(fleet: Fleet) -> dict:
    return fleet.page.evaluate("window.megace.summary()")


def _wait(fleet: Fleet, js: str, timeout_s: float) -> None:
    fleet.page.wait_for_function(js, timeout=timeout_s * 1000)


def test_the_page_lists_the_runs_sites_edges_and_devices_and_their_history(fleet: Fleet) -> None:
    seen = _summary(fleet)
    assert sorted(seen["sites"]) == [site(e) for e in range(EDGES)]
    for e in range(EDGES):
        s = seen["sites"][site(e)]
        assert list(s["edges"]) == [f"edge-{e}"]
        assert sorted(s["devices"]) == [device(e, d) for d in range(DEVICES_PER_EDGE)]
        assert s["edges"][f"edge-{e}"]["state"] == "offline"  # the loop stopped its services cleanly
        # one point per round, gained live while the loop ran (a retained message holds only the last one)
        assert s["edges"][f"edge-{e}"]["rounds"] == list(range(1, ROUNDS + 1))
    assert seen["cloud"] == {CLOUD_ID: "offline"}
    assert seen["globals"] == list(range(1, ROUNDS + 1))
    assert seen["errors"] == 0
    # what the charts really hold: x = rounds for accuracy, one series per edge; a version timeline
    acc = fleet.page.evaluate("window.megace.charts.acc.data")
    assert acc[0] == list(range(1, ROUNDS + 1)) and len(acc) == 1 + EDGES
    assert all(v is None or 0 <= v <= 100 for series in acc[1:] for v in series)
    assert fleet.page.evaluate("window.megace.charts.globals.data[1]") == list(range(1, ROUNDS + 1))
    assert fleet.page.evaluate("window.megace.charts.latency.data[0].length") > 0
    assert fleet.page.evaluate("window.megace.state.renderError") is None
    assert fleet.page_errors == []
    tree = fleet.page.inner_text("#tree")
    assert all(device(e, d) in tree for e in range(EDGES) for d in range(DEVICES_PER_EDGE))
    # drill-down: a click on a device shows its own figures
    fleet.page.click(f"li.device[data-id='{device(1, 0)}']")
    fleet.page.wait_for_selector("#device-table", timeout=5000)
    table = fleet.page.inner_text("#device-table")
    assert device(1, 0) in table and site(1) in table and "rtt p50 / p99" in table
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    fleet.page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000


def test_foreign_and_malformed_messages_are_counted_and_the_page_keeps_working(fleet: Fleet) -> None:
    before = _summary(fleet)["errors"]
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    c.connect(fleet.addr.host, fleet.addr.port)
    c.loop_start()
    try:
        bad = [
            (topics.status(topics.Role.EDGE, "edge-x", "site-x"), b"\xff not json {"),
            (topics.status(topics.Role.EDGE, "edge-x", "site-x"), json.dumps({"v": 2, "role": "edge"}).encode()),
            # a document naming another edge than its topic: not merged into edge-x
            (topics.metrics(topics.Role.EDGE, "edge-x", "site-x"),
             json.dumps({"v": 1, "role": "edge", "id": "edge-y", "ts": 1, "metrics": {}}).encode()),
            (f"{topics.ROOT}/status/alien/x", b"{}"),
        ]
        for topic, payload in bad:
            c.publish(topic, payload, qos=1).wait_for_publish(5)
        good = {"v": 1, "role": "device", "id": "late-dev", "state": "online", "ts": time.time(),
                "detail": {"site": "site-x"}}
        c.publish(topics.status(topics.Role.DEVICE, "late-dev", "site-x"), json.dumps(good), qos=1).wait_for_publish(5)
    finally:
        c.disconnect()
        c.loop_stop()
    _wait(fleet, "window.megace.summary().sites['site-x'] !== undefined", 10)
    seen = _summary(fleet)
    assert seen["errors"] == before + len(bad)
    assert seen["sites"]["site-x"] == {"edges": {}, "devices": {"late-dev": "online"}}
    _wait(fleet, f"document.getElementById('errors').textContent === '{before + len(bad)} errors'", 5)
    assert fleet.page.evaluate("window.megace.state.renderError") is None and fleet.page_errors == []


def test_an_edge_killed_with_sigkill_turns_offline_within_its_keep_alive(fleet: Fleet, tmp_path: Path) -> None:
    keepalive = 2
    cfg = edge_config(tmp_path / "edge", fleet.addr, {
        "broker": f"mqtt://{fleet.addr.host}:{fleet.addr.port}?keepalive={keepalive}", "site": "site-k",
        "edge_id": "edge-k"})
    path = cfg.write(tmp_path / "edge.toml")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with open(tmp_path / "edge.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "edge_agent", "--config", str(path)], cwd=REPO, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        online = "(s => s.sites['site-k'] && s.sites['site-k'].edges['edge-k'] && " \
                 "s.sites['site-k'].edges['edge-k'].state === 'online')(window.megace.summary())"
        _wait(fleet, online, 90)
        killed = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        _wait(fleet, online.replace("'online'", "'offline'"), 2 * keepalive + 5)
        # MQTT: the broker gives up on a silent client after 1.5 keep-alives, then publishes its will
        assert time.monotonic() - killed <= 1.5 * keepalive + 3
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        _clear(fleet, topics.status(topics.Role.EDGE, "edge-k", "site-k"))


def _clear(fleet: Fleet, topic: str) -> None:
    """Remove a retained message this test left (the broker is the session's own, but keep it tidy)."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    c.connect(fleet.addr.host, fleet.addr.port)
    c.loop_start()
    c.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
    c.disconnect()
    c.loop_stop()
