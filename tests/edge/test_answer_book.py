"""The edge's book of answers on its own (no broker, a hand-driven clock): what a repeated request gets.

Why: a repeat of a request being answered must not be queued again, a repeat of an answered one must get the same
bytes (a device drops it as a redelivery if it had the first), and everything else is answered afresh; the book is
bounded, newest kept. Expectations follow from those documented rules, counted by hand.
"""

from __future__ import annotations

import pytest

from broker.metrics import Counters
from edge_agent import answers as answers_module
from edge_agent.answers import PENDING_TTL_S, AnswerBook
from edge_agent.outgoing import Outgoing


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [1000.0]
    monkeypatch.setattr(answers_module.time, "monotonic", lambda: now[0])
    return now


def _answer(tag: bytes) -> list[Outgoing]:
    return [Outgoing("down/prediction", tag, done=lambda: None)]


def test_a_pending_request_is_a_repeat_until_its_ttl_then_it_is_answered_afresh(clock: list[float]) -> None:
    counters = Counters()
    book = AnswerBook(counters)
    assert book.pending_ttl_s == PENDING_TTL_S == 30.0
    out: list[Outgoing] = []
    assert not book.repeated("d", 1, out)  # never seen: answer it
    book.accepted("d", 1, new=True)
    clock[0] += PENDING_TTL_S  # exactly the TTL: still on its way
    assert book.repeated("d", 1, out) and out == []
    assert (counters["duplicates"], counters["infer_repeats_pending"], counters["infer_repeats_answered"]) == (1, 1, 0)
    clock[0] += 0.5  # past it: taken as lost
    assert not book.repeated("d", 1, out) and out == []
    assert counters["duplicates"] == 1 and counters["infer_repeats_fresh"] == 0
    book.accepted("d", 1, new=False)  # answered once before, its answer no longer kept
    assert counters["infer_repeats_fresh"] == 1 and len(book) == 1


def test_an_answered_request_gets_its_kept_answer_without_the_first_ack_callback(clock: list[float]) -> None:
    counters = Counters()
    book = AnswerBook(counters)
    book.accepted("d", 5, new=True)
    first = _answer(b"answer-5")
    assert book.record("d", 5, first) is first  # handed back as is, ``done`` and all
    clock[0] += 10 * PENDING_TTL_S  # an answer does not expire
    out = [Outgoing("other", b"already there")]
    assert book.repeated("d", 5, out) and book.repeated("d", 5, out)
    kept = ("down/prediction", b"answer-5", None)
    assert [(o.topic, o.payload, o.done) for o in out] == [("other", b"already there", None), kept, kept]
    assert (counters["duplicates"], counters["infer_repeats_answered"], counters["infer_repeats_pending"]) == (2, 2, 0)
    assert not book.repeated("e", 5, out)  # the same seq from another device is another request


def test_an_empty_answer_is_not_kept_so_a_repeat_is_answered_afresh(clock: list[float]) -> None:
    book = AnswerBook(Counters())
    book.accepted("d", 9, new=True)
    assert book.record("d", 9, []) == []
    assert len(book) == 0 and not book.repeated("d", 9, [])
    assert book.record("d", 10, []) == [] and len(book) == 0  # nothing to forget: no error either


def test_the_newest_entries_are_kept_and_a_repeat_counts_as_new(clock: list[float]) -> None:
    book = AnswerBook(Counters(), capacity=2)
    book.record("d", 1, _answer(b"1"))
    book.record("d", 2, _answer(b"2"))
    assert len(book) == 2  # at capacity, nothing forgotten yet
    assert book.repeated("d", 1, [])  # 1 is now the newest
    book.accepted("d", 3, new=True)  # one too many: the oldest, 2, goes
    assert len(book) == 2 and book.repeated("d", 1, []) and not book.repeated("d", 2, []) and book.repeated("d", 3, [])


def test_capacity_is_at_least_one(clock: list[float]) -> None:
    book = AnswerBook(Counters(), capacity=0)
    book.record("d", 1, _answer(b"1"))
    assert len(book) == 1 and book.repeated("d", 1, [])
    book.record("d", 2, _answer(b"2"))
    assert len(book) == 1 and not book.repeated("d", 1, [])


def test_forget_drops_only_that_devices_entries(clock: list[float]) -> None:
    book = AnswerBook(Counters())
    for dev in ("d", "e"):
        book.record(dev, 1, _answer(dev.encode()))
        book.accepted(dev, 2, new=True)
    book.forget("d")
    assert len(book) == 2 and not book.repeated("d", 1, []) and not book.repeated("d", 2, [])
    out: list[Outgoing] = []
    assert book.repeated("e", 1, out) and [o.payload for o in out] == [b"e"] and book.repeated("e", 2, [])
