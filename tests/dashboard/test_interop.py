"""deploy/dashboard/node-red-flow.json reads the JSON topics unchanged: its function node, run by node the way
Node-RED runs it (``msg`` with the parsed payload, a ``context`` store), rebuilds the closed loop's fleet from
every message the run published, and counts a document that names another member than its topic."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from broker import topics
from megace.loop.configs import CLOUD_ID
from tests.dashboard.fleetkit import DEVICES_PER_EDGE, EDGES, ROUNDS, Fleet, device, site

FLOW = Path(__file__).resolve().parents[2] / "deploy" / "dashboard" / "node-red-flow.json"
RUNNER = r"""
const fs = require('fs');
const flow = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const node = flow.find(n => n.type === 'function');
const fn = new Function('msg', 'context', 'node', node.func);
const store = {};
const context = {get: k => store[k], set: (k, v) => { store[k] = v; }};
let last = null, acc = [];
for (const line of fs.readFileSync(0, 'utf8').split('\n').filter(Boolean)) {
  const out = fn(JSON.parse(line), context, {});
  if (out) { last = out[0].payload; if (out[1]) acc.push([out[1].topic, out[1].payload]); }
}
console.log(JSON.stringify({last: last, acc: acc, errors: store.fleet.errors}));
"""


def test_the_flow_subscribes_to_the_dashboard_topics_as_json() -> None:
    flow = json.loads(FLOW.read_text())
    ins = [n for n in flow if n["type"] == "mqtt in"]
    assert sorted(n["topic"] for n in ins) == sorted([topics.all_events(), topics.all_metrics(), topics.all_status()])
    assert all(n["datatype"] == "json" and n["wires"] == [["megace-fleet"]] for n in ins)


def test_the_flows_function_rebuilds_the_runs_fleet(fleet: Fleet, tmp_path: Path) -> None:
    node = shutil.which("node")
    assert node, "node is needed to run the Node-RED function (Debian: apt install nodejs)"
    lines = [json.dumps({"topic": t, "payload": json.loads(p)}) for t, p, _ in fleet.live if p]
    foreign = {"v": 1, "role": "edge", "id": "someone-else", "ts": 1, "metrics": {}}
    lines.append(json.dumps({"topic": topics.metrics(topics.Role.EDGE, "edge-0", site(0)), "payload": foreign}))
    script = tmp_path / "run.js"
    script.write_text(RUNNER)
    out = subprocess.run([node, str(script), str(FLOW)], input="\n".join(lines), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    rows = {(r["role"], r["site"], r["id"]): r["state"] for r in got["last"]["rows"]}
    want = {("cloud", "", CLOUD_ID): "offline"}
    for e in range(EDGES):
        want[("edge", site(e), f"edge-{e}")] = "offline"
        want.update({("device", site(e), device(e, d)): "offline" for d in range(DEVICES_PER_EDGE)})
    assert rows == want
    assert [g["version"] for g in got["last"]["globals"]] == list(range(1, ROUNDS + 1))
    assert got["errors"] == 1
    # one accuracy point per edge and round, the held-out accuracy of the round events, in percent
    rounds = {t: json.loads(p)["data"] for t, p, _ in fleet.live if p and "/events/edge/" in t}
    assert len(got["acc"]) == sum(1 for t, p, _ in fleet.live if p and "/events/edge/" in t
                                  and json.loads(p)["data"]["heldout_acc"] is not None)
    assert all(0 <= v <= 100 for _, v in got["acc"]) and len(rounds) == EDGES
