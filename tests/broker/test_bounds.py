"""Regressions from fuzzing and the reliability issue: hostile arrays, topics and chunk floods stay typed, bounded."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from broker import topics
from broker.chunking import Reassembler, frames
from broker.errors import ArrayFormatError, ChunkLimitError, OversizeError, TopicError
from broker.inbox import Inbox, publisher
from broker.wire import Kind, decode_array, encode_envelope
from tests.support.wire import raises_exactly

MiB = 1024 * 1024


@pytest.mark.parametrize("shape", [[0, 2**64 - 1], [0, 2**63], [0, 2**62], [0, 2**40, 2**40], [2**31, 2**31, 0]])
def test_an_empty_array_with_an_impossible_extent_is_an_array_format_error(shape: list[int]) -> None:
    with raises_exactly(ArrayFormatError, f"shape {shape!r} of dtype <f4 is too large for any array"):
        decode_array({"dtype": "<f4", "shape": shape, "data": b""})  # was numpy's ValueError


def test_the_largest_extent_still_decodes_when_empty() -> None:
    got = decode_array({"dtype": "|u1", "shape": [0, 2**62], "data": b""})  # 2**62 * 1 byte: at the bound
    assert got.shape == (0, 2**62) and got.size == 0


def _chunk(size: int, index: int = 0, count: int = 2, transfer: bytes = b"\x01" * 16) -> dict[str, Any]:
    """A chunk announcing a ``size``-byte transfer (the flood: announcements cost the sender nothing)."""
    return {"transfer": transfer, "index": index, "count": count, "size": size,
            "sha256": hashlib.sha256(b"x").digest(), "data": b"x"}


def test_one_sender_cannot_fill_the_reassembly_budget() -> None:
    """The known attack: four chunks announcing 64 MiB each held a 256 MiB budget and real uploads were refused."""
    r = Reassembler(max_bytes=256 * MiB, max_transfer_bytes=64 * MiB)
    assert (r.max_sender_bytes, r.max_sender_transfers) == (64 * MiB, 8)
    for i in range(4):
        assert r.feed("up|evil", _chunk(64 * MiB, transfer=bytes([i]) * 16), sender="site/evil") is None
    # each announcement displaced the attacker's own previous one: it never holds more than its share
    assert r.sender_bytes("site/evil") == 64 * MiB and r.open_transfers == 1 and r.evicted == 3
    payload = encode_envelope(Kind.ADAPTER, "edge-a", 1, {"blob": b"\x07" * 5000})
    inbox = Inbox(r, max_payload=64 * MiB)
    got = [inbox.accept(t, p) for t, p in frames(topics.adapter_up("good"), payload, sender="edge-a", max_packet=1024)]
    assert got[-1] is not None and got[-1][1].body == {"blob": b"\x07" * 5000}  # a real upload still gets through


def test_a_sender_over_its_share_loses_its_own_oldest_partial_and_nothing_else() -> None:
    now = [0.0]
    r = Reassembler(max_bytes=100, max_transfer_bytes=40, max_sender_bytes=50, max_sender_transfers=2,
                    clock=lambda: now[0])
    r.feed("k", _chunk(30, transfer=b"a" * 16), sender="s1")
    now[0] = 1.0
    r.feed("k", _chunk(20, transfer=b"b" * 16), sender="s1")
    r.feed("o", _chunk(40, transfer=b"c" * 16), sender="s2")
    now[0] = 2.0
    r.feed("k", _chunk(25, transfer=b"d" * 16), sender="s1")  # 20 + 25 fits only without the oldest (30)
    assert sorted(t for (_, t) in r._open) == [b"b" * 16, b"c" * 16, b"d" * 16]
    assert (r.sender_bytes("s1"), r.sender_bytes("s2"), r.evicted) == (45, 40, 1)
    now[0] = 3.0
    r.feed("k", _chunk(5, transfer=b"e" * 16), sender="s1")  # a third partial: over the count share of 2
    assert sorted(t for (_, t) in r._open) == [b"c" * 16, b"d" * 16, b"e" * 16] and r.evicted == 2


def test_the_global_bound_refuses_without_evicting_anything() -> None:
    r = Reassembler(max_bytes=100, max_transfer_bytes=60, max_sender_bytes=60, max_sender_transfers=2)
    r.feed("a", _chunk(50, transfer=b"a" * 16), sender="s1")
    r.feed("b", _chunk(45, transfer=b"b" * 16), sender="s2")
    before = dict(r._open)
    with raises_exactly(ChunkLimitError, "transfer of 10 bytes would exceed the reassembly budget"):
        r.feed("c", _chunk(10, transfer=b"c" * 16), sender="s3")
    assert r._open == before and r.evicted == 0
    # s1 may replace its own partial even though the global budget is nearly full
    r.feed("a", _chunk(55, transfer=b"d" * 16), sender="s1")
    assert r.sender_bytes("s1") == 55 and r.evicted == 1
    with raises_exactly(ChunkLimitError, "transfer of 61 bytes exceeds the per-sender budget of 60"):
        Reassembler(max_bytes=200, max_transfer_bytes=100, max_sender_bytes=60).feed("a", _chunk(61), sender="s")
    with raises_exactly(OversizeError, "transfer of 101 bytes exceeds the limit of 100"):
        Reassembler(max_bytes=200, max_transfer_bytes=100).feed("a", _chunk(101))  # refused at the first frame


def test_the_inbox_charges_the_topic_publisher_not_the_self_declared_sender() -> None:
    inbox = Inbox(Reassembler(max_bytes=10 * MiB, max_transfer_bytes=MiB, max_sender_transfers=1))
    base = topics.device_up("s", "d1", topics.Uplink.FEATURES)
    for n, sender in enumerate(("alias-1", "alias-2")):
        env = encode_envelope(Kind.CHUNK, sender, 1, _chunk(1000, transfer=bytes([n]) * 16))
        assert inbox.accept(topics.chunk(base, 0), env) is None
    assert inbox.reassembler.open_transfers == 1 and inbox.reassembler.evicted == 1
    assert publisher(topics.parse(base)) == "device/s/d1"
    assert publisher(topics.parse(topics.adapter_up("s"))) == "site/s"
    assert publisher(topics.parse(topics.global_down())) == "cloud"


@pytest.mark.parametrize("index", ["\u00b2", "9" * 5000])
def test_found_by_fuzzing_a_chunk_index_that_is_digits_but_not_an_int_is_a_topic_error(index: str) -> None:
    topic = f"{topics.device_up('s', 'd', topics.Uplink.FEATURES)}/chunk/{index}"
    with raises_exactly(TopicError):
        Inbox().accept(topic, encode_envelope(Kind.FEATURES, "d", 1, {}))  # int("²") was a plain ValueError

