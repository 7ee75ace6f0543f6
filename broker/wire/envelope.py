"""The versioned envelope every msgpack payload on the bus travels in.

``{"v": 1, "k": kind, "s": sender, "n": seq, "t": unix_ms, "ct": content_type, "b": body}``,
keys in that order, so encoding is deterministic and test vectors are stable.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import msgpack

from broker import WIRE_VERSION
from broker.compat import StrEnum, slotted_dataclass
from broker.errors import DecodeError, OversizeError, SchemaVersionError, UnknownKindError

DEFAULT_MAX_PAYLOAD = 512 * 1024 * 1024
"""Largest payload a decoder accepts unless told otherwise (chunked transfers reassemble to this)."""


class Kind(StrEnum):
    """What an envelope's body is."""

    FEATURES = "features"
    REGISTER = "register"
    INFER = "infer"
    CONFIG = "config"
    PREDICTION = "prediction"
    FEEDBACK = "feedback"
    MODEL = "model"
    ERROR = "error"
    ADAPTER = "adapter"
    GLOBAL = "global"
    SITE_FEEDBACK = "site_feedback"
    CHUNK = "chunk"
    FEATURES_BATCH = "features_batch"
    REGISTER_REQUEST = "register_request"
    RECEIPT = "receipt"


def content_type(kind: Kind) -> str:
    return _CONTENT_TYPES[Kind(kind)]


_local = threading.local()
"""One reusable msgpack Packer per thread (a Packer is not thread-safe; building one per message cost
a third of the envelope's encoding time on the SDK's per-record path)."""
_CONTENT_TYPES: dict[Kind, str] = {k: f"application/vnd.megace.{k.value}+msgpack" for k in Kind}
_VALUES: dict[Kind, str] = {k: k.value for k in Kind}  # a dict lookup is cheaper than Enum's ``.value``


@slotted_dataclass(frozen=True)
class Envelope:
    """A decoded envelope; ``body`` is still the plain msgpack structure."""

    kind: Kind
    sender: str
    seq: int
    ts_ms: int
    content_type: str
    body: Any
    version: int = WIRE_VERSION


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def encode_envelope(
    kind: Kind,
    sender: str,
    seq: int,
    body: Any,
    *,
    ts_ms: int | None = None,
    ctype: str | None = None,
) -> bytes:
    """Pack ``body`` (msgpack-ready: maps, lists, scalars, bytes/memoryviews) into an envelope."""
    if type(kind) is not Kind:  # the per-record path passes a Kind: skip Enum's slow __call__
        kind = Kind(kind)
    try:
        packer = _local.packer
    except AttributeError:
        packer = _local.packer = msgpack.Packer(use_bin_type=True)
    n = int(seq)
    ts = time.time_ns() // 1_000_000 if ts_ms is None else int(ts_ms)
    ct = ctype or _CONTENT_TYPES[kind]
    if type(sender) is str:
        head = _HEADS.get((kind, sender))
        if head is None:
            head = _head(packer, kind, sender)
        # the rest of the map packed as a 7-item array: the same bytes after the array's 1-byte header
        return head + packer.pack((n, "t", ts, "ct", ct, "b", body))[1:]
    return packer.pack({"v": WIRE_VERSION, "k": _VALUES[kind], "s": sender, "n": n, "t": ts, "ct": ct, "b": body})


_HEADS: dict[tuple[Kind, str], bytes] = {}
"""The packed start of an envelope, up to its ``"n"`` key, per (kind, sender): the same for every message of one
sender, so packing it once saves building and walking a 7-key map per message (the SDK's per-record path)."""
_HEADS_MAX = 256


def _head(packer: msgpack.Packer, kind: Kind, sender: str) -> bytes:
    """``{"v": 1, "k": kind, "s": sender, "n"`` in msgpack: the 7-entry map header, three entries and a key."""
    head = b"\x87" + packer.pack(("v", WIRE_VERSION, "k", _VALUES[kind], "s", sender, "n"))[1:]
    if len(_HEADS) >= _HEADS_MAX:  # a process that speaks for many senders (tests, tools): stay bounded
        _HEADS.clear()
    _HEADS[(kind, sender)] = head
    return head


_KEYS = frozenset({"v", "k", "s", "n", "t", "ct", "b"})
_KIND_BY_VALUE: dict[str, Kind] = {k.value: k for k in Kind}
_unpackb = msgpack.unpackb


def decode_envelope(
    payload: bytes | bytearray | memoryview,
    *,
    expect: Kind | frozenset[Kind] | None = None,
    max_size: int = DEFAULT_MAX_PAYLOAD,
) -> Envelope:
    """Unpack and check an envelope; every failure is a :class:`broker.errors.WireError`."""
    if len(payload) > max_size:
        raise OversizeError(f"payload of {len(payload)} bytes exceeds the limit of {max_size}")
    try:
        obj = _unpackb(payload, raw=False, strict_map_key=False, use_list=True)
    except Exception as exc:  # msgpack raises many unrelated types on garbage
        raise DecodeError(f"not a msgpack document: {type(exc).__name__}: {exc}") from None
    # keys view == set: no temporary set per message (hot path of every receiver)
    if not isinstance(obj, dict) or len(obj) != 7 or obj.keys() != _KEYS:
        raise DecodeError("an envelope is a map with exactly the keys v, k, s, n, t, ct, b")
    v = obj["v"]
    if type(v) is not int or v != WIRE_VERSION:  # True and 1.0 compare equal to 1 in Python, not on the wire
        raise SchemaVersionError(f"schema version {v!r} is not supported (this code speaks {WIRE_VERSION})")
    k = obj["k"]
    kind = _KIND_BY_VALUE.get(k) if isinstance(k, str) else None  # same as Kind(k), without the enum machinery
    if kind is None:
        raise UnknownKindError(f"unknown envelope kind {k!r}")
    if expect is not None:
        allowed = {expect} if isinstance(expect, Kind) else expect
        if kind not in allowed:
            raise UnknownKindError(f"expected {sorted(k.value for k in allowed)}, got {kind.value!r}")
    sender, seq, ts, ct = obj["s"], obj["n"], obj["t"], obj["ct"]
    if not isinstance(sender, str) or not isinstance(ct, str):
        raise DecodeError("envelope sender and content type must be strings")
    if not _is_int(seq) or not _is_int(ts) or seq < 0 or ts < 0:
        raise DecodeError("envelope seq and timestamp must be non-negative integers")
    return Envelope(kind=kind, sender=sender, seq=seq, ts_ms=ts, content_type=ct, body=obj["b"])




def check_content_type(env: Envelope) -> None:
    """Refuse an envelope whose ``ct`` is not the one its kind names.

    ``k`` alone decides how a body is read; a ``ct`` that disagrees is a sender bug today and would be misread
    if a later version gives ``ct`` a meaning (a content encoding), so receivers that enforce it (the edge, on
    device uplinks) refuse it rather than guess. ``decode_envelope`` itself does not check it.
    """
    if env.content_type != _CONTENT_TYPES[env.kind]:
        raise DecodeError(f"content type {env.content_type!r} does not match kind {env.kind.value!r} "
                          f"(expected {_CONTENT_TYPES[env.kind]!r})")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
