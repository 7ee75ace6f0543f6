"""The receiving half of the contract: topic + payload in, checked envelope out."""

from __future__ import annotations

import pytest

from broker import topics
from broker.chunking import Reassembler, frames
from broker.errors import ChunkError, DecodeError, OversizeError, TopicError, UnknownKindError
from broker.inbox import Inbox
from broker.wire import Kind, decode_envelope, encode_envelope
from broker.wire.envelope import DEFAULT_MAX_PAYLOAD
from tests.support.wire import raises_exactly

UP = topics.device_up("s1", "d1", topics.Uplink.FEATURES)


def _env(kind: Kind = Kind.FEATURES, sender: str = "d1", body: object = None, seq: int = 1) -> bytes:
    return encode_envelope(kind, sender, seq, {"x": 1} if body is None else body, ts_ms=5)


def _same_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.urandom", lambda n: bytes(n))


def test_plain_message() -> None:
    inbox = Inbox()
    parsed, env = inbox.accept(UP, _env())  # type: ignore[misc]
    assert parsed == topics.parse(UP) and parsed.device == "d1" and parsed.chunk_index is None
    assert (env.kind, env.sender, env.seq, env.body) == (Kind.FEATURES, "d1", 1, {"x": 1})
    assert inbox.foreign == 0


def test_topic_is_checked_first() -> None:
    with raises_exactly(TopicError):
        Inbox().accept("other/v1/thing", _env())
    with raises_exactly(TopicError):
        Inbox().accept("other/v1/thing", b"")


def test_defaults_and_limits() -> None:
    inbox = Inbox()
    assert inbox.max_payload == DEFAULT_MAX_PAYLOAD and inbox.channels is None
    assert inbox.reassembler.max_transfer_bytes == DEFAULT_MAX_PAYLOAD
    small = Inbox(max_payload=100)
    assert small.max_payload == 100 and small.reassembler.max_transfer_bytes == 100
    own = Reassembler(max_transfers=3)
    assert Inbox(own).reassembler is own


def test_payload_limit_applies_to_plain_messages() -> None:
    payload = _env()
    assert Inbox(max_payload=len(payload)).accept(UP, payload) is not None
    with raises_exactly(OversizeError):
        Inbox(max_payload=len(payload) - 1).accept(UP, payload)


def test_payload_limit_applies_to_chunks_and_to_the_whole() -> None:
    whole = _env(body={"blob": bytes(3000)})
    msgs = frames(UP, whole, sender="d1", max_packet=1000)
    first = msgs[0][1]
    with raises_exactly(OversizeError, f"payload of {len(first)} bytes exceeds the limit of 900"):
        Inbox(max_payload=900).accept(*msgs[0])  # a chunk envelope larger than the limit
    with raises_exactly(OversizeError, f"transfer of {len(whole)} bytes exceeds the limit of {len(whole) - 1}"):
        Inbox(max_payload=len(whole) - 1).accept(*msgs[0])  # every chunk fits, the announced whole does not
    inbox = Inbox(max_payload=len(whole))
    results = [inbox.accept(t, p) for t, p in msgs]
    assert results[:-1] == [None] * (len(msgs) - 1) and results[-1] is not None
    # with a reassembler of its own, the inbox still holds the reassembled whole to its limit
    lenient = Inbox(Reassembler(), max_payload=len(whole) - 1)
    for t, p in msgs[:-1]:
        assert lenient.accept(t, p) is None
    with raises_exactly(OversizeError, f"payload of {len(whole)} bytes exceeds the limit of {len(whole) - 1}"):
        lenient.accept(*msgs[-1])


def test_foreign_channels_are_counted_and_dropped() -> None:
    inbox = Inbox(channels=frozenset({topics.Channel.GLOBAL_DOWN}))
    status = topics.status(topics.Role.EDGE, "e0")
    assert inbox.accept(status, b"not even msgpack") is None
    assert inbox.accept(topics.chunk(UP, 0), b"\xc1") is None
    assert inbox.accept(status, b"") is None
    assert inbox.foreign == 3
    parsed, env = inbox.accept(topics.global_down(), _env(Kind.GLOBAL, "cloud"))  # type: ignore[misc]
    assert parsed.channel is topics.Channel.GLOBAL_DOWN and env.kind is Kind.GLOBAL
    assert inbox.foreign == 3


def test_errors_in_plain_messages_are_typed() -> None:
    with raises_exactly(DecodeError):
        Inbox().accept(UP, b"\xc1")


def test_chunk_topics_carry_only_chunks() -> None:
    with raises_exactly(UnknownKindError, "expected ['chunk'], got 'features'"):
        Inbox().accept(topics.chunk(UP, 0), _env())


def test_chunk_body_must_be_a_map() -> None:
    with raises_exactly(DecodeError, "chunk body must be a map"):
        Inbox().accept(topics.chunk(UP, 0), _env(Kind.CHUNK, body=[0]))


def test_chunk_index_must_match_its_topic() -> None:
    msgs = frames(UP, _env(body={"blob": bytes(3000)}), sender="d1", max_packet=1000)
    inbox = Inbox()
    with raises_exactly(ChunkError, "chunk body index 0 != topic index 2"):
        inbox.accept(msgs[2][0], msgs[0][1])
    body = decode_envelope(msgs[0][1]).body
    with raises_exactly(ChunkError, "chunk body index None != topic index 0"):
        inbox.accept(msgs[0][0], _env(Kind.CHUNK, body={k: v for k, v in body.items() if k != "index"}))
    assert inbox.reassembler.open_transfers == 0


def test_chunked_message_comes_out_on_its_base_topic() -> None:
    whole = _env(body={"blob": bytes(3000)}, seq=77)
    msgs = frames(UP, whole, sender="d1", seq=5, max_packet=1000)
    inbox = Inbox()
    out = [inbox.accept(t, p) for t, p in reversed(msgs)]
    assert out[:-1] == [None] * (len(msgs) - 1)
    parsed, env = out[-1]  # type: ignore[misc]
    assert parsed == topics.parse(UP)
    assert env.seq == 77 and env.kind is Kind.FEATURES and env.body == {"blob": bytes(3000)}
    assert inbox.reassembler.completed == 1 and inbox.reassembler.open_transfers == 0


def test_transfers_from_different_senders_or_topics_do_not_mix(monkeypatch: pytest.MonkeyPatch) -> None:
    _same_id(monkeypatch)  # the worst case: equal transfer ids
    a = frames(UP, _env(sender="d1", body={"blob": b"a" * 3000}), sender="d1", max_packet=1000)
    b = frames(UP, _env(sender="d2", body={"blob": b"b" * 3000}), sender="d2", max_packet=1000)
    other = topics.device_up("s1", "d3", topics.Uplink.FEATURES)
    c = frames(other, _env(sender="d1", body={"blob": b"c" * 3000}), sender="d1", max_packet=1000)
    assert decode_envelope(a[0][1]).body["transfer"] == decode_envelope(b[0][1]).body["transfer"]
    inbox = Inbox()
    done = []
    for i in range(len(a)):
        for t, p in (a[i], b[i], c[i]):
            if (got := inbox.accept(t, p)) is not None:
                done.append((got[0].base, got[1].sender, got[1].body["blob"][:1]))
    assert done == [(UP, "d1", b"a"), (UP, "d2", b"b"), (other, "d1", b"c")]


def test_a_chunk_may_not_contain_a_chunk() -> None:
    inner = _env(Kind.CHUNK, body={"blob": bytes(2000)})
    msgs = frames(UP, inner, sender="d1", max_packet=1000)
    inbox = Inbox()
    for t, p in msgs[:-1]:
        assert inbox.accept(t, p) is None
    with raises_exactly(ChunkError, "a chunked transfer may not contain another chunk"):
        inbox.accept(*msgs[-1])
