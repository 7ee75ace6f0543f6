from __future__ import annotations

import hashlib
import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker import topics
from broker.chunking import Reassembler, frames
from broker.errors import ChunkError, ChunkHashError, ChunkLimitError, OversizeError
from broker.inbox import Inbox
from broker.wire import Kind, decode_envelope, encode_envelope

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


def test_bad_hash_is_detected() -> None:
    bodies = _chunk_bodies(_payload(5000))
    bodies[1] = {**bodies[1], "data": bytes(len(bodies[1]["data"]))}
    r = Reassembler()
    with pytest.raises(ChunkHashError):
        for b in bodies:
            r.feed("k", b)


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


def test_memory_and_transfer_bounds() -> None:
    r = Reassembler(max_transfers=1, max_bytes=10_000)
    r.feed("a", _chunk_bodies(_payload(5000))[0])
    with pytest.raises(ChunkLimitError):
        r.feed("b", _chunk_bodies(_payload(5000))[0])
    r2 = Reassembler(max_bytes=3000)
    with pytest.raises(ChunkLimitError):
        r2.feed("a", _chunk_bodies(_payload(5000))[0])
    with pytest.raises(OversizeError):
        Reassembler(max_transfer_bytes=100).feed("a", _chunk_bodies(_payload(5000))[0])


def test_inconsistent_chunks_are_rejected() -> None:
    bodies = _chunk_bodies(_payload(5000))
    r = Reassembler()
    r.feed("k", bodies[0])
    assert r.feed("k", bodies[0]) is None  # an exact duplicate is harmless
    with pytest.raises(ChunkError):
        r.feed("k", {**bodies[0], "data": b"x" + bodies[0]["data"][1:]})
    with pytest.raises(ChunkError):
        r.feed("k", {**bodies[1], "count": bodies[1]["count"] + 1})
    with pytest.raises(ChunkError):
        r.feed("k", {**bodies[1], "index": 10_000})
    with pytest.raises(ChunkError):
        r.feed("k", {**bodies[1], "transfer": b"short"})


def test_topic_index_must_match_body_index() -> None:
    msgs = frames(TOPIC, _payload(5000), sender="c", max_packet=1000)
    with pytest.raises(ChunkError):
        Inbox().accept(msgs[1][0], msgs[0][1])


def test_small_payload_is_not_chunked() -> None:
    p = _payload(10)
    assert frames(TOPIC, p, sender="c") == [(TOPIC, p)]
    assert hashlib.sha256(p).digest()  # sanity: payload intact


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
