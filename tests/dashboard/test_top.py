"""``megace top`` run as a real command, headless (``--once``), against the broker of the dashboard tests' closed
loop: its screen lists the run's cloud, sites, edges and devices with what the run did, and counts unreadable
messages instead of failing on them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import paho.mqtt.client as mqtt

from broker import topics
from megace.dashboard.model import Fleet as Model
from megace.loop.configs import CLOUD_ID
from tests.dashboard.fleetkit import DEVICES_PER_EDGE, EDGES, ROUNDS, Fleet, device, site

REPO = Path(__file__).resolve().parents[2]
BAD = {  # retained while the command runs, cleared after: a dashboard opened now must survive them
    topics.status(topics.Role.EDGE, "edge-z", "site-z"): b"{not json",
    topics.metrics(topics.Role.EDGE, "edge-z", "site-z"): json.dumps(
        {"v": 1, "role": "device", "id": "edge-z", "ts": 1, "metrics": {}}).encode(),  # names another role
}


def _publish(fleet: Fleet, messages: dict[str, bytes]) -> None:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    c.connect(fleet.addr.host, fleet.addr.port)
    c.loop_start()
    try:
        for topic, payload in messages.items():
            c.publish(topic, payload, qos=1, retain=True).wait_for_publish(5)
    finally:
        c.disconnect()
        c.loop_stop()


def test_top_shows_the_runs_fleet_and_counts_unreadable_messages(fleet: Fleet) -> None:
    _publish(fleet, BAD)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "megace", "top", "--broker", f"mqtt://{fleet.addr.host}:{fleet.addr.port}",
             "--once", "--wait", "3", "--width", "200"],
            cwd=REPO, capture_output=True, text=True, timeout=60)
    finally:
        _publish(fleet, dict.fromkeys(BAD, b""))
    assert out.returncode == 0, out.stderr
    screen = out.stdout
    lines = screen.splitlines()
    cloud_row = next(line for line in lines if CLOUD_ID in line)
    assert "offline" in cloud_row and f" {ROUNDS} " in cloud_row  # the last global version
    assert f"v{ROUNDS}: edge-0,edge-1" in screen
    for e in range(EDGES):
        assert f"site {site(e)}" in screen
        edge_row = next(line for line in lines if f"edge edge-{e} " in line)
        assert "offline" in edge_row and f" {ROUNDS} " in edge_row  # its last round
        for d in range(DEVICES_PER_EDGE):
            row = next(line for line in lines if f"device {device(e, d)} " in line)
            assert "offline" in row and " ms" in row  # a round trip was measured
    assert "2 errors (unreadable messages)" in screen


def test_the_model_refuses_what_it_cannot_read_and_keeps_the_rest() -> None:
    model = Model()
    good = {"v": 1, "role": "device", "id": "d1", "state": "online", "ts": 1.0, "detail": {"site": "s1"}}
    assert model.handle(topics.status(topics.Role.DEVICE, "d1", "s1"), json.dumps(good).encode())
    refused = [
        (topics.status(topics.Role.DEVICE, "d1", "s2"), json.dumps(good).encode()),  # site differs from topic
        (topics.status(topics.Role.DEVICE, "d2", "s1"), json.dumps(good).encode()),  # id differs
        (topics.status(topics.Role.DEVICE, "d1", "s1"), json.dumps({**good, "v": True}).encode()),
        (topics.status(topics.Role.DEVICE, "d1", "s1"), json.dumps({**good, "state": "sleeping"}).encode()),
        (topics.events(topics.Role.EDGE, "e1", "s1"), b'{"v":1,"role":"edge","id":"e1","ts":1,"event":"round",'
                                                         b'"data":{"round":"x"}}'),
        ("megace/v1/status/edge", b"{}"),
        ("other/topic", b"{}"),
    ]
    for topic, payload in refused:
        assert not model.handle(topic, payload), topic
    assert model.errors == len(refused)
    assert model.sites["s1"]["device"]["d1"].state == "online"
    # the pre-site layout still reads, its site taken from the status
    legacy = {**good, "id": "d9", "detail": {"site": "s9"}}
    assert model.handle("megace/v1/status/device/d9", json.dumps(legacy).encode())
    assert model.sites["s9"]["device"]["d9"].state == "online"
