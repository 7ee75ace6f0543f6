"""The SDK's request book on its own (no broker): when a request goes again, when it is given up, which answers
reach the application. Times are given explicitly; the expected schedule is worked out by hand from the documented
rule (first re-send ``retry_s`` after sending, then after twice as long each time, ``max_tries`` publishes in all).
"""

from __future__ import annotations

from types import SimpleNamespace

from broker.metrics import Counters
from broker.wire import Kind
from device_sdk.requests import CHECK_EVERY_S, RequestBook

STEP = 0.125


def pred(sample: int) -> SimpleNamespace:
    return SimpleNamespace(sample=sample)


def err(ref: int | None) -> SimpleNamespace:
    return SimpleNamespace(ref=ref)


def never(_seq: int) -> bool:
    return False


def resends(book: RequestBook, until: float) -> list[tuple[float, int]]:
    """Step the clock by 1/8 s (binary-exact, above the book's check period) up to ``until``: (time, seq) of each
    re-send."""
    assert STEP >= CHECK_EVERY_S
    out = []
    for step in range(int(until / STEP) + 1):
        out.extend((step * STEP, seq) for seq, _ in book.due(step * STEP, never))
    return out


def test_an_unanswered_request_goes_again_backing_off_then_is_given_up() -> None:
    counters = Counters()
    book = RequestBook(1.0, 4, counters)
    book.sent(7, sample=70, payload=b"req-7", now=0.0)
    assert resends(book, 20.0) == [(1.0, 7), (3.0, 7), (7.0, 7)]  # 4 publishes: the first and three re-sends
    assert counters["infer_resent"] == 3 and counters["infer_given_up"] == 1 and not book.outstanding


def test_the_resend_carries_the_first_publish_bytes_and_waits_for_the_brokers_ack() -> None:
    book = RequestBook(1.0, 3, Counters())
    book.sent(7, sample=70, payload=b"exact bytes", now=0.0)
    assert book.due(1.0, lambda seq: seq == 7) == []  # still in flight: the timer starts over
    book.next_check = 0.0
    assert book.due(1.5, never) == []
    book.next_check = 0.0
    assert book.due(2.0, never) == [(7, b"exact bytes")]


def test_an_answer_completes_its_request_and_a_second_one_never_reaches_the_app() -> None:
    counters = Counters()
    book = RequestBook(1.0, 4, counters)
    got: list[tuple[Kind, object]] = []
    deliver = book.wrap(lambda kind, message: got.append((kind, message)))
    book.sent(1, sample=10, payload=b"a", now=0.0)
    book.sent(2, sample=20, payload=b"b", now=0.0)
    first, again = pred(10), pred(10)
    deliver(Kind.PREDICTION, first)
    deliver(Kind.PREDICTION, again)  # the same request answered by another worker, or afresh
    busy, busy_again = err(2), err(2)
    deliver(Kind.ERROR, busy)
    deliver(Kind.ERROR, busy_again)
    record_error = err(99)  # about a record, not a request: always the application's
    deliver(Kind.ERROR, record_error)
    assert got == [(Kind.PREDICTION, first), (Kind.ERROR, busy), (Kind.ERROR, record_error)]
    assert counters["infer_duplicate_answers"] == 2 and not book.outstanding
    assert resends(book, 10.0) == []  # answered: never sent again


def test_a_new_request_for_a_sample_answered_before_takes_its_own_answer() -> None:
    book = RequestBook(1.0, 4, Counters())
    book.sent(1, sample=5, payload=b"a", now=0.0)
    assert book.answer(Kind.PREDICTION, pred(5))
    book.sent(2, sample=5, payload=b"b", now=0.0)  # the same sample id asked again later
    assert book.answer(Kind.PREDICTION, pred(5)) and not book.outstanding
    assert not book.answer(Kind.PREDICTION, pred(5))


def test_a_given_up_request_still_takes_its_first_late_answer_once() -> None:
    counters = Counters()
    book = RequestBook(1.0, 1, counters)
    book.sent(3, sample=30, payload=b"a", now=0.0)
    assert resends(book, 2.0) == [] and counters["infer_given_up"] == 1
    assert book.answer(Kind.PREDICTION, pred(30))
    assert not book.answer(Kind.PREDICTION, pred(30)) and counters["infer_duplicate_answers"] == 1


def test_outstanding_requests_are_bounded_the_oldest_given_up() -> None:
    counters = Counters()
    book = RequestBook(1.0, 4, counters, max_outstanding=2)
    for seq in range(3):
        book.sent(seq, sample=seq, payload=b"x", now=0.0)
    assert list(book.outstanding) == [1, 2] and counters["infer_given_up"] == 1
    assert book.answer(Kind.PREDICTION, pred(0))  # its answer still reaches the application, once


def test_retry_zero_never_resends_but_still_takes_one_answer() -> None:
    book = RequestBook(0.0, 4, Counters())
    book.sent(1, sample=1, payload=b"a", now=0.0)
    assert resends(book, 30.0) == []
    assert book.answer(Kind.PREDICTION, pred(1)) and not book.answer(Kind.PREDICTION, pred(1))
