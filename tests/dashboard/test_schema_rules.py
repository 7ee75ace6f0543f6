"""The schemas themselves and the topic layout: what :func:`megace.dashboard.schema.check` must refuse."""

from __future__ import annotations

import json

import pytest
from jsonschema import Draft202012Validator

from broker import topics
from broker.errors import TopicError
from megace.dashboard.schema import SCHEMAS, check, load

STATUS = {"v": 1, "role": "edge", "id": "e1", "state": "online", "ts": 1.7e9,
          "detail": {"site": "s1", "rank": 4, "backbone": "tiny", "modalities": ["accel"]}}
ROUND = {"v": 1, "role": "edge", "id": "e1", "site": "s1", "ts": 1.7e9, "event": "round",
         "data": {"round": 1, "global_version": 0, "loss": 0.5, "train_acc": 0.5, "heldout_acc": None, "samples": 10,
                  "heldout_samples": 0, "duration_s": 0.1, "upload_bytes": 100, "bytes_up": 100, "bytes_down": 5}}


@pytest.mark.parametrize("name", SCHEMAS)
def test_each_schema_is_a_valid_draft_2020_12_schema(name: str) -> None:
    Draft202012Validator.check_schema(load(name))


def test_site_topics_are_built_and_parsed() -> None:
    assert topics.status(topics.Role.DEVICE, "gw-7", "site-a") == "megace/v1/status/device/site-a/gw-7"
    assert topics.metrics(topics.Role.EDGE, "e1", "s1") == "megace/v1/metrics/edge/s1/e1"
    assert topics.events(topics.Role.CLOUD, "c") == "megace/v1/events/cloud/c"
    p = topics.parse("megace/v1/events/edge/s1/e1")
    assert (p.channel, p.role, p.site, p.ident, p.base) == (
        topics.Channel.EVENTS, topics.Role.EDGE, "s1", "e1", "megace/v1/events/edge/s1/e1")
    assert topics.parse("megace/v1/status/device/gw-7").site is None  # the pre-site layout still parses
    for bad in ("megace/v1/status/edge/s 1/e1", "megace/v1/events/edge/a/b/c", "megace/v1/metrics/alien/s/e"):
        with pytest.raises(TopicError):
            topics.parse(bad)
    with pytest.raises(TopicError):
        topics.status(topics.Role.EDGE, "e1", "bad/site")


def test_valid_documents_pass() -> None:
    assert check("megace/v1/status/edge/s1/e1", json.dumps(STATUS).encode()) == []
    assert check("megace/v1/events/edge/s1/e1", json.dumps(ROUND).encode()) == []
    for mixed in (0.25, None):
        event = {**ROUND, "data": {**ROUND["data"], "mix_weight": mixed}}
        assert check("megace/v1/events/edge/s1/e1", json.dumps(event).encode()) == []


@pytest.mark.parametrize("topic, doc, why", [
    ("megace/v1/status/edge/s2/e1", STATUS, "site"),  # the document's site is not the topic's
    ("megace/v1/status/edge/s1/e2", STATUS, "id"),
    ("megace/v1/status/edge/s1/e1", {**STATUS, "v": True}, "v"),  # JSON true is not version 1
    ("megace/v1/status/edge/s1/e1", {**STATUS, "state": "asleep"}, "state"),
    ("megace/v1/status/edge/s1/e1", {**STATUS, "detail": {"site": "s1"}}, "rank"),  # an edge says its rank
    ("megace/v1/events/edge/s1/e1", {**ROUND, "data": {**ROUND["data"], "train_acc": 1.5}}, "train_acc"),
    ("megace/v1/events/edge/s1/e1", {**ROUND, "data": {**ROUND["data"], "extra": 1}}, "extra"),
    ("megace/v1/events/edge/s1/e1", {**ROUND, "data": {**ROUND["data"], "mix_weight": 1.5}}, "mix_weight"),
    ("megace/v1/events/edge/s1/e1", {**ROUND, "event": "global"}, "round"),
    ("megace/v1/metrics/broker/b1", {"v": 1, "role": "broker", "id": "b1", "ts": 1, "metrics": {}}, "dashboard"),
])
def test_check_refuses(topic: str, doc: dict, why: str) -> None:
    errors = check(topic, json.dumps(doc).encode())
    assert errors and any(why in e for e in errors), errors


def test_check_refuses_bytes_that_are_not_json() -> None:
    assert check("megace/v1/status/edge/s1/e1", b"\xff{")
    assert check("elsewhere/x", b"{}")
