"""The dashboard topics' JSON Schemas (``schemas/*.json``, package data) and a checker by topic.

A dashboard reads JSON status, metrics and events that any role may publish; the schemas are the
contract (docs/METRICS.md), and :func:`check` is what the tests hold the real services' messages to.
The topic decides the schema, and the document must name the same role, id and site as its topic,
so a message published under another's name is an error, not a silently merged fleet member.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from broker import topics
from broker.errors import TopicError

SCHEMAS = ("status", "metrics.device", "metrics.edge", "metrics.cloud", "event.round", "event.global")


@cache
def load(name: str) -> dict[str, Any]:
    """One schema document, from the installed package."""
    if name not in SCHEMAS:
        raise KeyError(name)
    return json.loads(resources.files("megace.dashboard").joinpath(f"schemas/{name}.json").read_text())


def schema_name(parsed: topics.Parsed) -> str | None:
    """Which schema a dashboard topic's payload follows (None: not a dashboard topic)."""
    role = parsed.role.value if parsed.role is not None else ""
    if parsed.channel is topics.Channel.STATUS:
        return "status"
    if parsed.channel is topics.Channel.METRICS and role in ("device", "edge", "cloud"):
        return f"metrics.{role}"
    if parsed.channel is topics.Channel.EVENTS:
        return {"edge": "event.round", "cloud": "event.global"}.get(role)
    return None


def check(topic: str, payload: bytes) -> list[str]:
    """Every reason ``payload`` on ``topic`` breaks the schema or disagrees with its topic; [] when valid."""
    from jsonschema import Draft202012Validator  # a dev dependency: only checkers need it

    try:
        parsed = topics.parse(topic)
    except TopicError as exc:
        return [str(exc)]
    name = schema_name(parsed)
    if name is None:
        return [f"{topic}: not a dashboard topic"]
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        return [f"{topic}: not JSON: {exc}"]
    errors = [f"{topic}: {'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in Draft202012Validator(load(name)).iter_errors(doc)]
    if isinstance(doc, dict):
        expect = {"role": parsed.role.value if parsed.role else None, "id": parsed.ident}
        if parsed.site is not None:
            where = doc.get("site", doc.get("detail", {}).get("site") if isinstance(doc.get("detail"), dict) else None)
            if where != parsed.site:
                errors.append(f"{topic}: site {where!r} is not the topic's {parsed.site!r}")
        errors += [f"{topic}: {k} {doc.get(k)!r} is not the topic's {v!r}"
                   for k, v in expect.items() if doc.get(k) != v]
    return errors
