from __future__ import annotations

import hashlib
import os
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker import topics
from broker.chunking import _CHUNK_OVERHEAD, DEFAULT_MAX_PACKET, MAX_CHUNKS, Reassembler, frames
from broker.errors import ChunkError, ChunkHashError, ChunkLimitError, DecodeError, OversizeError
from broker.inbox import Inbox
from broker.wire import Kind, decode_envelope, encode_envelope
from broker.wire.envelope import DEFAULT_MAX_PAYLOAD
from tests.support.wire import raises_exactly

TOPIC = topics.global_down()


def _payload(n: int) -> bytes:
    return encode_envelope(Kind.GLOBAL, "cloud", 1, {"blob": os.urandom(n)})


@settings(max_examples=30, deadline=None)
@given(size=st.integers(0, 20_000), packet=st.integers(300, 5_000), seed=st.integers(0, 1000))
def test_any_order_reassembles(size: int, packet: int, seed: int) -> None:
    payload = _payload(size)
    msgs = frames(TOPIC, payload, sender="cloud", max_packet=packet)
    random.Random(seed).shuffle(msgs)
    inbox = Inbox()
    results = [r for t, p in msgs if (r := inbox.accept(t, p)) is not None]
    assert len(results) == 1
    parsed, env = results[0]
    assert parsed.base == TOPIC and parsed.chunk_index is None
    assert env.body == decode_envelope(payload).body
    assert inbox.reassembler.open_transfers == 0


def _chunk_bodies(payload: bytes, packet: int = 1000) -> list[dict]:
    return [decode_envelope(p).body for _, p in frames(TOPIC, payload, sender="c", max_packet=packet)]


def _bodies(data: bytes, pieces: int, **over: Any) -> list[dict[str, Any]]:
    """Hand-made chunk bodies: ``data`` cut into ``pieces`` parts of one transfer."""
    step = -(-len(data) // pieces) if data else 0
    base = {"transfer": bytes(range(16)), "count": pieces, "size": len(data), "sha256": hashlib.sha256(data).digest()}
    base.update(over)
    return [{**base, "index": i, "data": data[i * step : (i + 1) * step]} for i in range(pieces)]


# ---------------------------------------------------------------- splitting


def test_small_payload_is_not_chunked() -> None:
    p = _payload(10)
    assert frames(TOPIC, p, sender="c") == [(TOPIC, p)]
    assert frames(TOPIC, b"", sender="c") == [(TOPIC, b"")]
    assert DEFAULT_MAX_PACKET == 256 * 1024


def test_packet_budget_boundary() -> None:
    p = _payload(2000)
    assert frames(TOPIC, p, sender="c", max_packet=len(p)) == [(TOPIC, p)]
    chunked = frames(TOPIC, p, sender="c", max_packet=len(p) - 1)
    assert len(chunked) == 2 and all(t == topics.chunk(TOPIC, i) for i, (t, _) in enumerate(chunked))
    big = b"\x00" * (DEFAULT_MAX_PACKET + 1)
    assert len(frames(TOPIC, big, sender="c")) == 2
    assert frames(TOPIC, big[:-1], sender="c") == [(TOPIC, big[:-1])]


def test_chunk_layout() -> None:
    whole = bytes(range(256)) * 4  # 1024 bytes
    msgs = frames(TOPIC, whole, sender="cloud-1", seq=41, max_packet=_CHUNK_OVERHEAD + 300, ts_ms=1234)
    assert [t for t, _ in msgs] == [f"{TOPIC}/chunk/{i}" for i in range(4)]
    envs = [decode_envelope(p, expect=Kind.CHUNK) for _, p in msgs]
    assert {(e.sender, e.seq, e.ts_ms) for e in envs} == {("cloud-1", 41, 1234)}
    bodies = [e.body for e in envs]
    assert [b["index"] for b in bodies] == [0, 1, 2, 3]
    assert {b["count"] for b in bodies} == {4} and {b["size"] for b in bodies} == {1024}
    assert {b["sha256"] for b in bodies} == {hashlib.sha256(whole).digest()}
    transfer = bodies[0]["transfer"]
    assert len(transfer) == 16 and {b["transfer"] for b in bodies} == {transfer}
    assert [len(b["data"]) for b in bodies] == [300, 300, 300, 124]
    assert b"".join(b["data"] for b in bodies) == whole
    assert sorted(bodies[0]) == ["count", "data", "index", "sha256", "size", "transfer"]
    assert all(len(p) <= _CHUNK_OVERHEAD + 300 for _, p in msgs)
    assert decode_envelope(frames(TOPIC, whole, sender="c", max_packet=556)[0][1]).seq == 0  # default seq
    # every transfer gets a fresh id
    assert decode_envelope(frames(TOPIC, whole, sender="c", max_packet=556)[0][1]).body["transfer"] != transfer


def test_chunk_counts() -> None:
    per_chunk = 100
    packet = _CHUNK_OVERHEAD + per_chunk
    for size, count in [(packet + 1, 4), (400, 4), (401, 5), (1000, 10), (1001, 11)]:
        msgs = frames(TOPIC, b"x" * size, sender="c", max_packet=packet)
        assert len(msgs) == count
        assert all(len(p) <= packet for _, p in msgs)


def test_packet_budget_too_small_for_chunks() -> None:
    with pytest.raises(ValueError, match=r"^max_packet 256 is too small to carry chunks$"):
        frames(TOPIC, b"x" * 300, sender="c", max_packet=_CHUNK_OVERHEAD)
    assert len(frames(TOPIC, b"x" * 300, sender="c", max_packet=_CHUNK_OVERHEAD + 1)) == 300


def test_chunk_count_limit() -> None:
    assert MAX_CHUNKS == 65536
    packet = _CHUNK_OVERHEAD + 16
    assert len(frames(TOPIC, bytes(16 * MAX_CHUNKS), sender="c", max_packet=packet)) == MAX_CHUNKS
    with raises_exactly(OversizeError, f"{16 * MAX_CHUNKS + 1} bytes would need {MAX_CHUNKS + 1} chunks "
                                       f"(max {MAX_CHUNKS})"):
        frames(TOPIC, bytes(16 * MAX_CHUNKS + 1), sender="c", max_packet=packet)


# ---------------------------------------------------------------- reassembly


def test_reassembler_defaults() -> None:
    r = Reassembler()
    assert (r.max_transfers, r.max_bytes, r.max_transfer_bytes, r.timeout_s) == (32, DEFAULT_MAX_PAYLOAD,
                                                                                 DEFAULT_MAX_PAYLOAD, 60.0)
    assert (r.open_transfers, r.reserved_bytes, r.expired, r.completed) == (0, 0, 0, 0)


def test_reassembles_in_any_order_and_counts() -> None:
    data = bytes(range(200))
    r = Reassembler()
    parts = _bodies(data, 4)
    assert r.feed("k", parts[2]) is None
    assert (r.open_transfers, r.reserved_bytes) == (1, 200)
    assert r.feed("k", parts[0]) is None and r.feed("k", parts[3]) is None
    assert r.feed("k", parts[1]) == data
    assert (r.open_transfers, r.reserved_bytes, r.completed) == (0, 0, 1)
    assert r.feed("k", _bodies(b"second", 1)[0]) == b"second"
    assert r.completed == 2


def test_transfers_are_kept_apart_by_key_and_id() -> None:
    r = Reassembler()
    a, b = _bodies(b"A" * 10, 2), _bodies(b"B" * 10, 2)
    other_id = _bodies(b"C" * 10, 2, transfer=b"\xff" * 16)
    assert r.feed("k1", a[0]) is None and r.feed("k2", b[0]) is None and r.feed("k1", other_id[0]) is None
    assert (r.open_transfers, r.reserved_bytes) == (3, 30)
    assert r.feed("k2", b[1]) == b"B" * 10
    assert r.feed("k1", other_id[1]) == b"C" * 10
    assert r.feed("k1", a[1]) == b"A" * 10
    assert r.open_transfers == 0


def test_bad_hash_is_detected() -> None:
    bodies = _chunk_bodies(_payload(5000))
    bodies[1] = {**bodies[1], "data": bytes(len(bodies[1]["data"]))}
    r = Reassembler()
    for b in bodies[:-1]:
        assert r.feed("k", b) is None
    with raises_exactly(ChunkHashError, "reassembled payload does not match its sha256"):
        r.feed("k", bodies[-1])
    assert (r.open_transfers, r.reserved_bytes, r.completed) == (0, 0, 0)


def test_missing_piece_times_out_and_memory_is_released() -> None:
    now = [0.0]
    r = Reassembler(timeout_s=5, clock=lambda: now[0])
    bodies = _chunk_bodies(_payload(5000))
    for b in bodies[:-1]:
        assert r.feed("k", b) is None
    assert r.open_transfers == 1 and r.reserved_bytes > 5000
    now[0] = 10.0
    assert r.expire() == 1
    assert r.open_transfers == 0 and r.reserved_bytes == 0 and r.expired == 1
    # the last chunk now starts a new transfer that can never complete on its own
    assert r.feed("k", bodies[-1]) is None
    assert r.open_transfers == 1


def test_slow_but_steady_transfer_completes() -> None:
    """Chunks spread over far longer than the idle timeout, each within it of the last, still reassemble:
    the timeout is on idleness, not on the age of the transfer."""
    now = [1000.0]
    r = Reassembler(timeout_s=5.0, clock=lambda: now[0])
    data = bytes(range(250)) * 4
    parts = _bodies(data, 10)
    got = None
    for part in parts:
        got = r.feed("k", part)
        now[0] += 5.0  # exactly the timeout between chunks: idle for 5 s is not idle for *longer* than 5 s
        assert r.expire() == 0
    assert now[0] - 1000.0 == 50.0  # ten times the timeout
    assert got == data and r.expired == 0 and r.completed == 1


def test_idle_transfer_expires() -> None:
    now = [0.0]
    r = Reassembler(timeout_s=5.0, clock=lambda: now[0])
    parts = _bodies(b"x" * 30, 3)
    assert r.feed("k", parts[0]) is None
    now[0] = 4.0
    assert r.feed("k", parts[1]) is None  # refreshes the transfer
    now[0] = 9.0
    assert r.expire() == 0 and r.open_transfers == 1  # idle exactly 5 s
    now[0] = 9.001
    assert r.expire() == 1 and r.open_transfers == 0 and r.reserved_bytes == 0 and r.expired == 1
    assert r.feed("k", parts[2]) is None  # too late: its transfer is gone
    assert r.open_transfers == 1


def test_feeding_expires_stale_transfers_first() -> None:
    now = [0.0]
    r = Reassembler(timeout_s=1.0, max_transfers=1, clock=lambda: now[0])
    assert r.feed("a", _bodies(b"a" * 4, 2)[0]) is None
    now[0] = 2.0
    assert r.feed("b", _bodies(b"b" * 4, 2)[0]) is None  # the stale transfer made room
    assert r.expired == 1 and r.open_transfers == 1
    now[0] = 4.0
    assert r.expire() == 1 and r.expired == 2


def test_expire_drops_only_stale_transfers() -> None:
    now = [0.0]
    r = Reassembler(timeout_s=10.0, clock=lambda: now[0])
    r.feed("old", _bodies(b"o" * 4, 2)[0])
    now[0] = 6.0
    r.feed("new", _bodies(b"n" * 4, 2)[0])
    now[0] = 12.0
    assert r.expire() == 1 and r.open_transfers == 1 and r.reserved_bytes == 4
    assert r.feed("new", _bodies(b"n" * 4, 2)[1]) == b"nnnn"


def test_default_clock_is_monotonic_and_generous() -> None:
    r = Reassembler()
    assert r.feed("k", _bodies(b"abcd", 2)[0]) is None
    assert r.expire() == 0 and r.open_transfers == 1


def test_memory_and_transfer_bounds() -> None:
    r = Reassembler(max_transfers=1, max_bytes=10_000)
    r.feed("a", _chunk_bodies(_payload(5000))[0])
    with raises_exactly(ChunkLimitError, "too many transfers in progress (1)"):
        r.feed("b", _chunk_bodies(_payload(5000))[0])
    r2 = Reassembler(max_bytes=3000)
    with raises_exactly(ChunkLimitError) as info:
        r2.feed("a", _chunk_bodies(_payload(5000))[0])
    assert str(info.value).endswith(" bytes would exceed the reassembly budget")
    with raises_exactly(OversizeError) as info2:
        Reassembler(max_transfer_bytes=100).feed("a", _chunk_bodies(_payload(5000))[0])
    assert str(info2.value).endswith(" bytes exceeds the limit of 100")


def test_bounds_are_inclusive() -> None:
    r = Reassembler(max_transfers=2, max_bytes=20, max_transfer_bytes=10)
    assert r.feed("a", _bodies(b"a" * 10, 2)[0]) is None
    assert r.feed("b", _bodies(b"b" * 10, 2)[0]) is None  # 2 transfers, 20 bytes: exactly at the bounds
    assert (r.open_transfers, r.reserved_bytes) == (2, 20)
    with raises_exactly(ChunkLimitError, "too many transfers in progress (2)"):
        r.feed("c", _bodies(b"c" * 1, 1)[0])
    # chunks of transfers already open are not limited
    assert r.feed("a", _bodies(b"a" * 10, 2)[1]) == b"a" * 10
    r3 = Reassembler(max_bytes=15)
    r3.feed("a", _bodies(b"a" * 5, 2)[0])
    assert r3.feed("b", _bodies(b"b" * 10, 2)[0]) is None  # 5 + 10 == 15
    with raises_exactly(ChunkLimitError, "transfer of 1 bytes would exceed the reassembly budget"):
        r3.feed("c", _bodies(b"c", 1)[0])
    with raises_exactly(OversizeError, "transfer of 11 bytes exceeds the limit of 10"):
        Reassembler(max_transfer_bytes=10).feed("a", _bodies(b"a" * 11, 2)[0])
    assert Reassembler(max_transfer_bytes=10).feed("a", _bodies(b"a" * 10, 1)[0]) == b"a" * 10


def test_inconsistent_chunks_are_rejected() -> None:
    bodies = _chunk_bodies(_payload(5000))
    r = Reassembler()
    r.feed("k", bodies[0])
    assert r.feed("k", bodies[0]) is None  # an exact duplicate is harmless
    with raises_exactly(ChunkError, "chunk 0 arrived twice with different data"):
        r.feed("k", {**bodies[0], "data": b"x" + bodies[0]["data"][1:]})
    mismatch = "chunk disagrees with earlier chunks of its transfer on count, size or sha256"
    with raises_exactly(ChunkError, mismatch):
        r.feed("k", {**bodies[1], "count": bodies[1]["count"] + 1})
    with raises_exactly(ChunkError, mismatch):
        r.feed("k", {**bodies[1], "size": bodies[1]["size"] + 1})
    with raises_exactly(ChunkError, mismatch):
        r.feed("k", {**bodies[1], "sha256": bytes(32)})
    with raises_exactly(ChunkError, f"chunk index 10000 / count {bodies[1]['count']} out of range"):
        r.feed("k", {**bodies[1], "index": 10_000})
    with raises_exactly(ChunkError, "chunk transfer id must be 16 bytes"):
        r.feed("k", {**bodies[1], "transfer": b"short"})
    assert r.open_transfers == 1  # none of that disturbed the transfer in progress
    for b in bodies[1:]:
        got = r.feed("k", b)
    assert got is not None and decode_envelope(got).kind is Kind.GLOBAL


GOOD_CHUNK = _bodies(b"0123456789", 2)[0]

MALFORMED_CHUNKS: list[tuple[str, Any, type[Exception], str]] = [
    ("not a map", [GOOD_CHUNK], DecodeError, "chunk body must be a map"),
    ("no transfer", {k: v for k, v in GOOD_CHUNK.items() if k != "transfer"}, ChunkError,
     "chunk transfer id must be 16 bytes"),
    ("transfer as str", {**GOOD_CHUNK, "transfer": "0123456789abcdef"}, ChunkError,
     "chunk transfer id must be 16 bytes"),
    ("transfer of 15", {**GOOD_CHUNK, "transfer": bytes(15)}, ChunkError, "chunk transfer id must be 16 bytes"),
    ("transfer of 17", {**GOOD_CHUNK, "transfer": bytes(17)}, ChunkError, "chunk transfer id must be 16 bytes"),
    ("no sha256", {k: v for k, v in GOOD_CHUNK.items() if k != "sha256"}, ChunkError, "chunk sha256 must be 32 bytes"),
    ("sha256 as hex", {**GOOD_CHUNK, "sha256": GOOD_CHUNK["sha256"].hex()}, ChunkError,
     "chunk sha256 must be 32 bytes"),
    ("sha256 of 31", {**GOOD_CHUNK, "sha256": bytes(31)}, ChunkError, "chunk sha256 must be 32 bytes"),
    ("sha256 of 33", {**GOOD_CHUNK, "sha256": bytes(33)}, ChunkError, "chunk sha256 must be 32 bytes"),
    ("no data", {k: v for k, v in GOOD_CHUNK.items() if k != "data"}, ChunkError, "chunk data must be binary"),
    ("data as str", {**GOOD_CHUNK, "data": "01234"}, ChunkError, "chunk data must be binary"),
    ("data as list", {**GOOD_CHUNK, "data": [0, 1]}, ChunkError, "chunk data must be binary"),
    ("no index", {k: v for k, v in GOOD_CHUNK.items() if k != "index"}, ChunkError, "missing field 'index'"),
    ("negative index", {**GOOD_CHUNK, "index": -1}, ChunkError, "field 'index' must be >= 0, got -1"),
    ("bool index", {**GOOD_CHUNK, "index": False}, ChunkError, "field 'index' must be an integer"),
    ("zero count", {**GOOD_CHUNK, "count": 0}, ChunkError, "field 'count' must be >= 1, got 0"),
    ("count as str", {**GOOD_CHUNK, "count": "2"}, ChunkError, "field 'count' has the wrong type str"),
    ("no size", {k: v for k, v in GOOD_CHUNK.items() if k != "size"}, ChunkError, "missing field 'size'"),
    ("negative size", {**GOOD_CHUNK, "size": -10}, ChunkError, "field 'size' must be >= 0, got -10"),
    ("index at count", {**GOOD_CHUNK, "index": 2}, ChunkError, "chunk index 2 / count 2 out of range"),
    ("too many chunks", {**GOOD_CHUNK, "count": MAX_CHUNKS + 1}, ChunkError,
     f"chunk index 0 / count {MAX_CHUNKS + 1} out of range"),
]


@pytest.mark.parametrize(("body", "cls", "message"), [c[1:] for c in MALFORMED_CHUNKS],
                         ids=[c[0] for c in MALFORMED_CHUNKS])
def test_each_chunk_check_raises_its_error(body: Any, cls: type[Exception], message: str) -> None:
    r = Reassembler()
    with raises_exactly(cls, message):
        r.feed("k", body)
    assert r.open_transfers == 0


def test_largest_chunk_count_is_accepted() -> None:
    r = Reassembler()
    assert r.feed("k", {**GOOD_CHUNK, "count": MAX_CHUNKS, "index": MAX_CHUNKS - 1}) is None
    assert r.open_transfers == 1


def test_chunks_may_not_carry_more_than_announced() -> None:
    r = Reassembler()
    parts = _bodies(b"0123456789", 2)
    assert r.feed("k", parts[0]) is None
    with raises_exactly(ChunkError, "chunks carry more bytes than the transfer announced"):
        r.feed("k", {**parts[1], "data": b"567890"})
    assert (r.open_transfers, r.reserved_bytes) == (0, 0)  # the poisoned transfer is dropped
    with raises_exactly(ChunkError, "chunks carry more bytes than the transfer announced"):
        Reassembler().feed("k", {**_bodies(b"abc", 1)[0], "data": b"abcd"})
    # the bytes of all chunks so far count, not just the last one's
    r2 = Reassembler()
    four = _bodies(b"0123456789ab", 3, size=10)  # 3 chunks of 4 bytes announced as 10
    assert r2.feed("k", four[0]) is None and r2.feed("k", four[1]) is None
    with raises_exactly(ChunkError, "chunks carry more bytes than the transfer announced"):
        r2.feed("k", four[2])


def test_chunks_carrying_too_little_are_rejected_once_complete() -> None:
    r = Reassembler()
    short = _bodies(b"0123456789", 2, size=12)  # all chunks present, 2 bytes short of the announced size
    assert r.feed("k", short[0]) is None
    with raises_exactly(ChunkError, "reassembled 10 bytes, transfer announced 12"):
        r.feed("k", short[1])
    assert r.open_transfers == 0 and r.completed == 0


def test_empty_transfer() -> None:
    assert Reassembler().feed("k", _bodies(b"", 1)[0]) == b""


# ---------------------------------------------------------------- through the inbox


def test_topic_index_must_match_body_index() -> None:
    msgs = frames(TOPIC, _payload(5000), sender="c", max_packet=1000)
    with raises_exactly(ChunkError, "chunk body index 0 != topic index 1"):
        Inbox().accept(msgs[1][0], msgs[0][1])


def test_empty_payload_is_a_retained_clear_not_a_message() -> None:
    assert Inbox().accept(topics.global_down(), b"") is None
    assert Inbox().accept(topics.chunk(topics.global_down(), 3), b"") is None


def test_site_named_chunk_still_parses() -> None:
    t = topics.site_feedback("chunk")
    assert topics.parse(t).site == "chunk"
    assert topics.parse(topics.chunk(t, 2)).base == t


def test_inbox_drops_foreign_channels_undecoded() -> None:
    inbox = Inbox(channels=frozenset({topics.Channel.DEVICE_DOWN}))
    assert inbox.accept(topics.status(topics.Role.EDGE, "e0"), b'{"v":1}') is None
    assert inbox.foreign == 1
    assert inbox.accept(topics.device_down("s", "d", topics.Downlink.CONFIG), _payload(3)) is not None
