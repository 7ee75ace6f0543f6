"""The dashboard topics of a real closed loop (edge processes, a cloud process, SDK devices, Mosquitto) hold to
docs/METRICS.md's JSON Schemas, carry the site, are retained, and say what really happened in the run."""

from __future__ import annotations

import json
import threading
import time
import uuid

import paho.mqtt.client as mqtt

from broker import topics
from megace.dashboard.schema import check
from megace.loop.configs import CLOUD_ID
from tests.dashboard.fleetkit import DEVICES_PER_EDGE, EDGES, ROUNDS, Fleet, device, site

CLOUD = CLOUD_ID


def _docs(fleet: Fleet, topic: str) -> list[dict]:
    return [json.loads(p) for t, p, _ in fleet.live if t == topic and p]


def _retained(fleet: Fleet) -> dict[str, bytes]:
    """What a dashboard opened after the run receives at once: the retained messages, by topic."""
    got: dict[str, bytes] = {}
    done = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"late-{uuid.uuid4().hex[:8]}")
    c.on_connect = lambda cl, *_: cl.subscribe([(topics.all_status(), 1), (topics.all_metrics(), 1),
                                                (topics.all_events(), 1)])
    c.on_message = lambda _c, _u, m: got.__setitem__(m.topic, bytes(m.payload)) if m.retain else done.set()
    c.connect(fleet.addr.host, fleet.addr.port)
    c.loop_start()
    try:
        deadline = time.monotonic() + 3.0
        last = -1
        while time.monotonic() < deadline:  # retained messages arrive at once after the SUBACK: wait for a lull
            time.sleep(0.3)
            if len(got) == last:
                break
            last = len(got)
    finally:
        c.disconnect()
        c.loop_stop()
    return got


def test_every_dashboard_message_of_the_run_matches_its_schema_and_topic(fleet: Fleet) -> None:
    published = [(t, p) for t, p, _ in fleet.live if p]
    assert len(published) > 20, published
    bad = {t: errs for t, p in published if (errs := check(t, p))}
    assert not bad, bad
    # strict JSON, as a browser's JSON.parse reads it: Python's json accepts NaN and Infinity, JSON does not
    non_json = [t for t, p in published if _has_non_json_number(p)]
    assert not non_json, non_json


def _has_non_json_number(payload: bytes) -> bool:
    found: list[str] = []
    json.loads(payload, parse_constant=found.append)
    return bool(found)


def test_every_role_publishes_status_and_metrics_under_its_site_and_events(fleet: Fleet) -> None:
    seen = {t for t, p, _ in fleet.live if p}
    want = {topics.status(topics.Role.CLOUD, CLOUD), topics.metrics(topics.Role.CLOUD, CLOUD),
            topics.events(topics.Role.CLOUD, CLOUD)}
    for e in range(EDGES):
        edge = (topics.Role.EDGE, f"edge-{e}", site(e))
        want |= {topics.status(*edge), topics.metrics(*edge), topics.events(*edge)}
        want |= {f(topics.Role.DEVICE, device(e, d), site(e)) for d in range(DEVICES_PER_EDGE)
                 for f in (topics.status, topics.metrics)}
    assert want <= seen, sorted(want - seen)
    # no edge or device topic without its site: every one of them has the 4-level layout
    members = [topics.parse(t) for t in seen if "/status/" in t or "/metrics/" in t or "/events/" in t]
    assert all(p.site is not None for p in members if p.role in (topics.Role.EDGE, topics.Role.DEVICE))


def test_a_dashboard_opened_after_the_run_reads_the_last_state_from_retained_messages(fleet: Fleet) -> None:
    retained = _retained(fleet)
    for topic, payload in retained.items():
        assert check(topic, payload) == [], topic
    for e in range(EDGES):
        st = json.loads(retained[topics.status(topics.Role.EDGE, f"edge-{e}", site(e))])
        assert st["state"] == "offline" and st["detail"]["site"] == site(e)  # stopped cleanly at the end
        last_round = _docs(fleet, topics.events(topics.Role.EDGE, f"edge-{e}", site(e)))[-1]
        assert json.loads(retained[topics.events(topics.Role.EDGE, f"edge-{e}", site(e))]) == last_round
        metrics = json.loads(retained[topics.metrics(topics.Role.EDGE, f"edge-{e}", site(e))])
        assert metrics["metrics"]["round"] == ROUNDS
        for d in range(DEVICES_PER_EDGE):
            assert topics.metrics(topics.Role.DEVICE, device(e, d), site(e)) in retained
    glob = json.loads(retained[topics.events(topics.Role.CLOUD, CLOUD)])
    assert glob["data"]["version"] == ROUNDS
    assert json.loads(retained[topics.metrics(topics.Role.CLOUD, CLOUD)])["metrics"]["version"] == ROUNDS


def test_global_events_name_each_version_and_its_contributors(fleet: Fleet) -> None:
    events = _docs(fleet, topics.events(topics.Role.CLOUD, CLOUD))
    assert [e["data"]["version"] for e in events] == list(range(1, ROUNDS + 1))
    for ev in events:
        data = ev["data"]
        assert data["contributors"] == [f"edge-{e}" for e in range(EDGES)]  # every edge uploads every round
        assert data["updates"] == EDGES and data["strategy"] == "modality-aware"
        assert data["norms"]["global"] > 0 and data["norms"]["step"] > 0
        assert sorted(data["sites"]) == [site(e) for e in range(EDGES)]
        assert abs(sum(s["weight"] for s in data["sites"].values()) - 1.0) < 1e-6
    final = _docs(fleet, topics.metrics(topics.Role.CLOUD, CLOUD))[-1]["metrics"]
    assert events[-1]["data"]["rejected"] == final["rejected_reasons"]


def test_round_events_follow_each_edges_training(fleet: Fleet) -> None:
    for e in range(EDGES):
        events = _docs(fleet, topics.events(topics.Role.EDGE, f"edge-{e}", site(e)))
        assert [ev["data"]["round"] for ev in events] == list(range(1, ROUNDS + 1))
        for ev in events:
            data = ev["data"]
            assert data["samples"] > 0 and data["loss"] is not None and data["loss"] > 0
            assert data["upload_bytes"] > 0  # federated: each round uploads its adapter
        # the round's bytes are the edge's own counters: never decreasing over rounds
        ups = [ev["data"]["bytes_up"] for ev in events]
        assert ups == sorted(ups)
        # rounds train on the global the edge holds (-1: none yet): versions never go back, and the last
        # round of a federated run trained on a real global
        versions = [ev["data"]["global_version"] for ev in events]
        assert versions == sorted(versions) and versions[-1] >= 0


def test_device_metrics_account_for_every_record_and_prediction(fleet: Fleet) -> None:
    for e in range(EDGES):
        for d in range(DEVICES_PER_EDGE):
            name = device(e, d)
            docs = _docs(fleet, topics.metrics(topics.Role.DEVICE, name, site(e)))
            assert docs, name
            final = docs[-1]["metrics"]  # published on close, after the last flush
            assert final["queued"] == 0 and final["inflight"] == 0 and final["dropped"] == 0
            assert final["sent"] > 0 and final["sent_by_kind"].get("features", 0) > 0
            if final["disconnects"] == 0:  # nothing re-sent: each record acknowledged exactly once
                assert final["acked"] == final["sent"], final
            rtt = final["rtt_ms"]
            assert final["predictions"] > 0 and rtt["count"] == final["predictions"], final
            assert 0 < rtt["p50"] <= rtt["p99"]
            assert final["last_error"] is None and final["model_version"] is None
            assert docs[-1]["site"] == site(e) == final["site"]
