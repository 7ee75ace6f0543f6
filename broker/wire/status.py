"""Status and metrics: JSON, not msgpack, so a browser dashboard can read them with no codec.

Status is published retained with a last-will of ``offline``, so a dashboard that
subscribes late still sees who is up.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, field
from typing import Any

from broker import WIRE_VERSION
from broker.compat import slotted_dataclass
from broker.errors import DecodeError, SchemaVersionError

ONLINE = "online"
OFFLINE = "offline"


@slotted_dataclass()
class Status:
    role: str
    id: str
    state: str
    ts: float = field(default_factory=time.time)
    detail: dict[str, Any] = field(default_factory=dict)
    v: int = WIRE_VERSION

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def decode(cls, payload: bytes) -> Status:
        obj = _load(payload)
        try:
            return cls(role=obj["role"], id=obj["id"], state=obj["state"], ts=float(obj["ts"]),
                       detail=dict(obj.get("detail", {})), v=obj["v"])
        except (KeyError, TypeError, ValueError, OverflowError) as exc:  # Overflow: "ts": 1e400 as a JSON int
            raise DecodeError(f"bad status document: {exc}") from None


def _finite(value: Any) -> Any:
    """NaN and infinities as null: JSON has no such numbers, and a browser's JSON.parse refuses the whole document."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _dumps(doc: dict[str, Any]) -> bytes:
    return json.dumps(_finite(doc), separators=(",", ":"), sort_keys=True, allow_nan=False,
                      default=lambda o: _finite(float(o))).encode()  # numpy scalars: read as floats


def metrics_payload(role: str, ident: str, values: dict[str, Any], site: str | None = None) -> bytes:
    """A JSON metrics document: ``{"v", "role", "id", "ts", "metrics": {...}}`` (+ ``"site"`` when given)."""
    doc: dict[str, Any] = {"v": WIRE_VERSION, "role": role, "id": ident, "ts": time.time(), "metrics": values}
    if site is not None:
        doc["site"] = site
    return _dumps(doc)


def event_payload(role: str, ident: str, event: str, values: dict[str, Any], site: str | None = None) -> bytes:
    """A JSON event document (docs/METRICS.md): ``{"v", "role", "id", "ts", "event", "data": {...}}``
    (+ ``"site"``): one per edge round or cloud global, retained so a late dashboard sees the last one."""
    doc: dict[str, Any] = {"v": WIRE_VERSION, "role": role, "id": ident, "ts": time.time(), "event": event,
                           "data": values}
    if site is not None:
        doc["site"] = site
    return _dumps(doc)


def decode_metrics(payload: bytes) -> dict[str, Any]:
    obj = _load(payload)
    if not isinstance(obj.get("metrics"), dict):
        raise DecodeError("metrics document has no metrics map")
    return obj


def _load(payload: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(payload)
    except (ValueError, UnicodeDecodeError, TypeError) as exc:
        raise DecodeError(f"not JSON: {exc}") from None
    except RecursionError:  # "[[[[..." nested deeper than the interpreter's stack
        raise DecodeError("not JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        raise DecodeError("expected a JSON object")
    if type(obj.get("v")) is not int or obj["v"] != WIRE_VERSION:  # JSON true and 1.0 are not version 1
        raise SchemaVersionError(f"schema version {obj.get('v')!r} is not supported")
    return obj
