"""RequestBook's edges: the check throttle, the back-off beyond the fourth publish, bounds, and which answers pass.

Why: an answer dropped wrongly leaves the application waiting for ever; one passed twice gives it two
predictions for one request; a wrong back-off floods the inference workers. Times are explicit and binary-exact;
the schedule is worked out by hand from the documented rule (``retry_s``, then twice as long each time).
"""

from __future__ import annotations

from broker.metrics import Counters
from broker.wire import Kind
from device_sdk.requests import CHECK_EVERY_S, DONE_MAX, MAX_OUTSTANDING, RequestBook
from tests.device_sdk.test_infer_requests import err, never, pred


def test_constants_and_clamps() -> None:
    assert (MAX_OUTSTANDING, DONE_MAX, CHECK_EVERY_S) == (4096, 4096, 0.1)
    counters = Counters()
    book = RequestBook(1.0, 0, counters, max_outstanding=0)
    assert (book.max_tries, book.max_outstanding, book.next_check) == (1, 1, 0.0)
    book = RequestBook(1.0, 4, counters, max_outstanding=1)
    book.sent(1, 1, b"a", now=0.0)
    book.sent(2, 2, b"b", now=0.0)
    assert list(book.outstanding) == [2] and counters["infer_given_up"] == 1


def test_sent_without_a_time_reads_the_clock() -> None:
    book = RequestBook(1000.0, 4, Counters())
    book.sent(1, 1, b"a")
    assert book.due(0.0, never) == []
    assert book.outstanding[1].due > 1000.0


def test_the_first_check_may_come_at_once_and_then_every_check_period() -> None:
    book = RequestBook(0.5, 4, Counters())
    book.sent(1, 1, b"a", now=0.0)
    assert book.due(0.5, never) == [(1, b"a")]  # a fresh book checks at any time

    book = RequestBook(0.0625, 4, Counters())
    book.sent(1, 1, b"a", now=0.0)
    assert book.due(0.0, never) == []  # checked at 0: next check at CHECK_EVERY_S
    assert book.due(0.0625, never) == []  # due, but within the check period
    assert book.due(CHECK_EVERY_S, never) == [(1, b"a")]  # exactly one period later


def test_a_request_not_yet_due_does_not_hide_a_later_one() -> None:
    book = RequestBook(1.0, 4, Counters())
    book.sent(1, 1, b"a", now=5.0)  # tracked first, due at 6
    book.sent(2, 2, b"b", now=0.0)  # due at 1
    assert book.due(1.0, never) == [(2, b"b")]


def test_back_off_doubles_each_time_until_given_up() -> None:
    counters = Counters()
    book = RequestBook(1.0, 5, counters)
    book.sent(1, 1, b"a", now=0.0)
    times = []
    t = 0.0
    while t <= 40.0:
        if book.due(t, never):
            times.append(t)
        t += 0.125
    # publishes at 0 (sent), then 1, 1+2=3, 3+4=7, 7+8=15; the fifth try is the last: given up at 15+16=31
    assert times == [1.0, 3.0, 7.0, 15.0]
    assert counters["infer_resent"] == 4 and counters["infer_given_up"] == 1 and not book.outstanding


def test_two_due_at_once_count_two() -> None:
    counters = Counters()
    book = RequestBook(1.0, 4, counters)
    book.sent(1, 1, b"a", now=0.0)
    book.sent(2, 2, b"b", now=0.0)
    assert book.due(1.0, never) == [(1, b"a"), (2, b"b")]
    assert counters["infer_resent"] == 2


def test_two_requests_for_one_sample_each_take_one_answer() -> None:
    counters = Counters()
    book = RequestBook(1.0, 4, counters)
    book.sent(1, 7, b"a", now=0.0)
    book.sent(2, 7, b"b", now=0.0)
    assert book.answer(Kind.PREDICTION, pred(7)) and list(book.outstanding) == [2]
    assert book.answer(Kind.PREDICTION, pred(7)) and not book.outstanding
    assert not book.answer(Kind.PREDICTION, pred(7)) and counters["infer_duplicate_answers"] == 1


def test_a_new_request_after_an_answered_one_gets_its_late_answer_after_giving_up() -> None:
    counters = Counters()
    book = RequestBook(1.0, 1, counters)
    book.sent(1, 5, b"a", now=0.0)
    assert book.answer(Kind.PREDICTION, pred(5))
    book.sent(2, 5, b"b", now=0.0)
    assert book.due(1.0, never) == [] and counters["infer_given_up"] == 1
    assert book.answer(Kind.PREDICTION, pred(5))  # the given-up request's first answer still passes
    assert not book.answer(Kind.PREDICTION, pred(5))


def test_errors_by_ref() -> None:
    counters = Counters()
    book = RequestBook(1.0, 1, counters)
    assert book.answer(Kind.ERROR, err(None))  # an error about no request at all
    assert book.answer(Kind.ERROR, err(999)) and book.answer(Kind.ERROR, err(999))  # not a request's: both pass
    book.sent(3, 3, b"c", now=0.0)
    assert book.due(1.0, never) == [] and counters["infer_given_up"] == 1
    assert book.answer(Kind.ERROR, err(3))  # late, once
    assert not book.answer(Kind.ERROR, err(3))
    assert counters["infer_duplicate_answers"] == 1


def test_other_downlinks_pass_untouched() -> None:
    book = RequestBook(1.0, 4, Counters())
    book.sent(1, 1, b"a", now=0.0)
    assert book.answer(Kind.RECEIPT, object())
    seen = []
    once = book.wrap(lambda kind, msg: seen.append(kind))
    once(Kind.CONFIG, object())
    once(Kind.PREDICTION, pred(1))
    once(Kind.PREDICTION, pred(1))
    assert seen == [Kind.CONFIG, Kind.PREDICTION] and list(book.outstanding) == []


def test_completed_requests_are_remembered_up_to_done_max() -> None:
    book = RequestBook(1.0, 4, Counters(), max_outstanding=DONE_MAX + 8)
    for seq in range(DONE_MAX):
        book.sent(seq, seq, b"x", now=0.0)
        assert book.answer(Kind.ERROR, err(seq))
    assert not book.answer(Kind.ERROR, err(0))  # the oldest of exactly DONE_MAX is still known
    book.sent(DONE_MAX, DONE_MAX, b"x", now=0.0)
    assert book.answer(Kind.ERROR, err(DONE_MAX))  # one more: the oldest is forgotten, the newest kept
    assert book.answer(Kind.ERROR, err(0))
    assert not book.answer(Kind.ERROR, err(DONE_MAX))
