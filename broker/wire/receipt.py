"""The edge's delivery receipt to one device (``receipt``): which of its records the edge has durably logged.

Why: a broker may acknowledge a QoS 1 publish (PUBACK) and lose it afterwards (a JetStream failover, a full
offline queue, a bridge restart), so the broker's acknowledgement does not prove delivery. The edge tells each
device, after the ingest-log commit that covers them, that every ``features``/``features_batch`` seq up to
``upto`` is logged except those in ``missing``; the device keeps every record until a receipt covers it and
re-sends the missing ones with their seq (docs/wire/SPEC.md, "Receipts").
"""

from __future__ import annotations

from typing import Any

from broker import topics
from broker.compat import slotted_dataclass
from broker.errors import DecodeError, TopicError, WireError
from broker.wire.fields import body_map, get_int, get_list, get_str


class ReceiptMismatchError(WireError):
    """A receipt names another device than the one whose topic it came on: it releases nothing."""


MAX_MISSING = 256
"""The most seqs one receipt lists as missing; an edge with more gaps lowers ``upto`` below the first unlisted."""


@slotted_dataclass(frozen=True)
class Receipt:
    """``{"device": str, "upto": int, "missing": [int, ...]}``; ``missing`` ascending, unique, below ``upto``."""

    device: str
    upto: int
    missing: tuple[int, ...] = ()

    def to_body(self) -> dict[str, Any]:
        _check(self.upto, self.missing)
        return {"device": topics.check_id(self.device, "device"), "upto": int(self.upto),
                "missing": [int(s) for s in self.missing]}

    @classmethod
    def from_body(cls, body: Any) -> Receipt:
        b = body_map(body, "receipt")
        device = get_str(b, "device") or ""
        try:
            topics.check_id(device, "device")
        except TopicError as exc:
            raise DecodeError(str(exc)) from None
        upto = get_int(b, "upto")
        raw = get_list(b, "missing", optional=True)
        if len(raw) > MAX_MISSING:
            raise DecodeError(f"a receipt lists at most {MAX_MISSING} missing seqs, got {len(raw)}")
        if any(isinstance(s, bool) or not isinstance(s, int) for s in raw):
            raise DecodeError("receipt missing seqs must be integers")
        missing = tuple(raw)
        _check(upto or 0, missing)
        return cls(device, upto or 0, missing)

    def covers(self, seq: int) -> bool:
        """Whether the edge has logged ``seq`` (at or below ``upto`` and not missing)."""
        return seq <= self.upto and seq not in self.missing


def _check(upto: int, missing: tuple[int, ...]) -> None:
    if upto < 0:
        raise DecodeError(f"receipt upto must be >= 0, got {upto}")
    if len(missing) > MAX_MISSING:
        raise DecodeError(f"a receipt lists at most {MAX_MISSING} missing seqs")
    prev = -1
    for s in missing:
        if not prev < s < upto:
            raise DecodeError("receipt missing seqs must be ascending, unique, >= 0 and below upto")
        prev = s
