"""The fleet as the dashboard topics describe it, for ``megace top`` (the web page has the same rules in fleet.js).

One MQTT message at a time: a message that cannot be read (not JSON, another schema version, a topic outside
the layout, a document naming another role, id or site than its topic) is counted in ``errors`` and changes
nothing else, so a foreign publisher can never break the view.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from broker import topics
from broker.errors import TopicError

KINDS = (topics.Channel.STATUS, topics.Channel.METRICS, topics.Channel.EVENTS)


@dataclass
class Member:
    """A device, edge or cloud: its last status, last metrics and (edges) its rounds."""

    role: str
    ident: str
    site: str | None
    state: str = "unknown"
    detail: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Fleet:
    """Cloud(s), then sites with their edges and devices; globals seen; unreadable messages counted."""

    cloud: dict[str, Member] = field(default_factory=dict)
    sites: dict[str, dict[str, dict[str, Member]]] = field(default_factory=dict)  # site -> edge|device -> id
    globals: list[dict[str, Any]] = field(default_factory=list)
    messages: int = 0
    errors: int = 0
    recent_errors: list[str] = field(default_factory=list)
    updated: float = 0.0

    def _fail(self, topic: str, why: str) -> bool:
        self.errors += 1
        self.recent_errors = [*self.recent_errors[-9:], f"{topic[:120]}: {why}"]
        return False

    def member(self, role: str, ident: str, site: str | None) -> Member:
        if site is None:
            return self.cloud.setdefault(ident, Member(role, ident, None))
        group = self.sites.setdefault(site, {"edge": {}, "device": {}})["edge" if role == "edge" else "device"]
        return group.setdefault(ident, Member(role, ident, site))

    def handle(self, topic: str, payload: bytes) -> bool:
        """Apply one message; False if it was refused (and counted) or cleared a retained topic."""
        self.messages += 1
        try:
            parsed = topics.parse(topic)
        except TopicError:
            return self._fail(topic, "not a megace/v1 topic")
        if parsed.channel not in KINDS or parsed.role is None or parsed.ident is None:
            return self._fail(topic, "not a dashboard topic")
        if not payload:
            return False  # an empty retained payload deletes the topic
        try:
            doc = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            return self._fail(topic, "not JSON")
        if not isinstance(doc, dict) or type(doc.get("v")) is not int or doc["v"] != 1:
            return self._fail(topic, "not a version 1 document")
        role, site = parsed.role.value, parsed.site
        if doc.get("role") != role or doc.get("id") != parsed.ident:
            return self._fail(topic, "role/id differ from the topic")
        detail = doc.get("detail")
        named = doc.get("site", detail.get("site") if isinstance(detail, dict) else None)
        if role in ("edge", "device") and site is None:
            site = named if isinstance(named, str) else None  # a pre-site publisher names it in its status
            if site is None:
                return self._fail(topic, "no site")
        elif named is not None and site is not None and named != site:
            return self._fail(topic, "site differs from the topic")
        try:
            ok = self._apply(parsed.channel, self.member(role, parsed.ident, site), doc)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            return self._fail(topic, f"bad document: {exc}")
        if ok:
            self.updated = time.time()
            return True
        return self._fail(topic, "missing fields")

    def _apply(self, channel: topics.Channel, m: Member, doc: dict[str, Any]) -> bool:
        if channel is topics.Channel.STATUS:
            if doc.get("state") not in ("online", "offline") or not isinstance(doc.get("detail"), dict):
                return False
            m.state, m.detail = doc["state"], doc["detail"]
            return True
        if channel is topics.Channel.METRICS:
            if not isinstance(doc.get("metrics"), dict):
                return False
            m.metrics = doc["metrics"]
            return True
        data = doc.get("data")
        if not isinstance(data, dict):
            return False
        if m.role == "edge" and doc.get("event") == "round":
            point = {"round": int(data["round"]), "loss": data.get("loss"), "acc": _acc(data)}
            m.rounds = [r for r in m.rounds if r["round"] != point["round"]] + [point]
            return True
        if m.role == "cloud" and doc.get("event") == "global":
            g = {"version": int(data["version"]), "contributors": [str(c) for c in data["contributors"]],
                 "strategy": str(data.get("strategy", "")), "rejected": dict(data.get("rejected", {}))}
            self.globals = sorted([x for x in self.globals if x["version"] != g["version"]] + [g],
                                  key=lambda x: x["version"])[-200:]
            return True
        return False


def _acc(data: dict[str, Any]) -> float | None:
    for key in ("heldout_acc", "train_acc"):
        value = data.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            return float(value)
    return None
