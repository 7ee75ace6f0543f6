"""The page's fleet model (megace/dashboard/static/fleet.js) under node: the same messages as the Python model
(megace.dashboard.model), the same verdicts, so the web page and ``megace top`` agree on what is an error."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from broker import topics
from megace.dashboard.model import Fleet as Model

FLEET_JS = Path(__file__).resolve().parents[2] / "megace" / "dashboard" / "static" / "fleet.js"
RUNNER = """
const fleet = require(process.argv[process.argv.length - 1]);
const state = fleet.createState();
const verdicts = [];
for (const line of require('fs').readFileSync(0, 'utf8').split('\\n').filter(Boolean)) {
  const [topic, payload] = JSON.parse(line);
  verdicts.push(fleet.handle(state, topic, Buffer.from(payload, 'latin1'), 100));
}
console.log(JSON.stringify({verdicts, summary: fleet.summary(state), latency: state.latency,
                            rejections: state.rejections, traffic: state.traffic}));
"""


def _doc(**kw: object) -> bytes:
    return json.dumps(kw).encode()


def _device_metrics(ident: str, p50: float, p99: float) -> bytes:
    rtt = {"count": 3, "window": 3, "lost": 0, "last": p50, "p50": p50, "p99": p99, "mean": p50}
    return _doc(v=1, role="device", id=ident, site="s1", ts=5.0, metrics={"rtt_ms": rtt, "queued": 0})


MESSAGES: list[tuple[str, bytes, bool]] = [  # (topic, payload, accepted)
    (topics.status(topics.Role.EDGE, "e1", "s1"), _doc(v=1, role="edge", id="e1", state="online", ts=1.0,
                                                       detail={"site": "s1"}), True),
    (topics.status(topics.Role.DEVICE, "d1", "s1"), _doc(v=1, role="device", id="d1", state="offline", ts=1.0,
                                                         detail={"site": "s1"}), True),
    (topics.metrics(topics.Role.DEVICE, "d1", "s1"), _device_metrics("d1", 10.0, 30.0), True),
    (topics.metrics(topics.Role.DEVICE, "d2", "s1"), _device_metrics("d2", 20.0, 50.0), True),
    (topics.metrics(topics.Role.EDGE, "e1", "s1"), _doc(v=1, role="edge", id="e1", site="s1", ts=2.0, metrics={
        "bytes_up": 1000, "bytes_down": 500, "rejected_by_class": {"DecodeError": 2}}), True),
    (topics.events(topics.Role.EDGE, "e1", "s1"), _doc(v=1, role="edge", id="e1", site="s1", ts=3.0, event="round",
                                                       data={"round": 1, "loss": 0.5, "heldout_acc": 0.75}), True),
    (topics.events(topics.Role.CLOUD, "c"), _doc(v=1, role="cloud", id="c", ts=4.0, event="global", data={
        "version": 1, "contributors": ["e1"], "strategy": "fedavg", "rejected": {"stale": 1}}), True),
    ("megace/v1/status/device/d9", _doc(v=1, role="device", id="d9", state="online", ts=1.0,  # pre-site layout
                                        detail={"site": "s9"}), True),
    # refused: each one a different rule
    (topics.status(topics.Role.EDGE, "e1", "s1"), b"\xff{not json", False),
    (topics.status(topics.Role.EDGE, "e1", "s1"), _doc(v=True, role="edge", id="e1", state="offline", ts=1.0,
                                                       detail={"site": "s1"}), False),
    (topics.status(topics.Role.EDGE, "e1", "s1"), _doc(v=1, role="edge", id="e2", state="offline", ts=1.0,
                                                       detail={"site": "s1"}), False),
    (topics.status(topics.Role.EDGE, "e1", "s1"), _doc(v=1, role="edge", id="e1", state="offline", ts=1.0,
                                                       detail={"site": "s2"}), False),
    (topics.status(topics.Role.EDGE, "e1", "s1"), _doc(v=1, role="edge", id="e1", state="gone", ts=1.0,
                                                       detail={"site": "s1"}), False),
    (topics.events(topics.Role.EDGE, "e1", "s1"), _doc(v=1, role="edge", id="e1", site="s1", ts=3.0, event="what",
                                                       data={}), False),
    ("megace/v1/status/device/d8", _doc(v=1, role="device", id="d8", state="online", ts=1.0, detail={}), False),
    ("megace/v1/status/alien/x", b"{}", False),
    ("megace/v1/site/s1/device/d1/up/features", b"\x87", False),
    ("elsewhere", b"[]", False),
]


def _run_js() -> dict:
    node = shutil.which("node")
    assert node, "node is needed (Debian: apt install nodejs)"
    lines = "\n".join(json.dumps([t, p.decode("latin1")]) for t, p, _ in MESSAGES)
    out = subprocess.run([node, "-e", RUNNER, str(FLEET_JS)], input=lines, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def js() -> dict:
    return _run_js()


def test_the_page_model_accepts_and_refuses_what_the_rules_say(js: dict) -> None:
    assert js["verdicts"] == [ok for _, _, ok in MESSAGES]
    refused = sum(1 for *_, ok in MESSAGES if not ok)
    assert js["summary"]["errors"] == refused
    assert js["summary"]["sites"]["s1"] == {"edges": {"e1": {"state": "online", "rounds": [1]}},
                                            "devices": {"d1": "offline", "d2": "unknown"}}
    assert js["summary"]["sites"]["s9"]["devices"] == {"d9": "online"}
    assert js["summary"]["globals"] == [1]


def test_the_page_aggregates_latency_traffic_and_rejections(js: dict) -> None:
    # after both devices: the median of their p50s (nearest lower of two) and the worst p99
    assert js["latency"][-1] == {"t": 100, "p50": 10.0, "p99": 50.0}
    assert js["traffic"][-1] == {"t": 100, "up": 1000, "down": 500}
    assert js["rejections"] == {"edge:DecodeError": 2, "cloud:stale": 1}


def test_the_python_model_gives_the_same_verdicts() -> None:
    model = Model()
    got = [model.handle(t, p) for t, p, _ in MESSAGES]
    assert got == [ok for _, _, ok in MESSAGES]
    assert model.errors == sum(1 for *_, ok in MESSAGES if not ok)
