"""The SDK's ReceiptBook at its boundaries: grace, probe timeout, back-off cap, check throttle, back-pressure.

Why: each boundary decides whether a device re-sends a record the edge lost (too late: data waits; too early
or too often: a re-send storm against an edge that is merely slow). The module reads ``time.monotonic``
directly; the tests set that clock, and every expected time is worked out by hand below.
"""

from __future__ import annotations

import pytest

from broker.metrics import Counters
from broker.wire.receipt import Receipt
from device_sdk import receipts as book_module
from device_sdk.receipts import ReceiptBook

FEATURES = "megace/v1/site/s/device/d/up/features"


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock(1000.0)
    monkeypatch.setattr(book_module.time, "monotonic", c)
    return c


def _book(timeout: float = 5.0, limit: int = 100) -> tuple[ReceiptBook, Counters]:
    counters = Counters()
    book = ReceiptBook(FEATURES, limit, timeout, counters)
    book.set_enabled(True)
    return book, counters


def _seqs(items: list) -> list[int]:
    return [seq for seq, _ in items]


def test_constants() -> None:
    assert (book_module.MISSING_GRACE_S, book_module.MAX_BACKOFF_DOUBLINGS, book_module.CHECK_EVERY_S) == (1.0, 5, 0.1)


def test_a_new_book_holds_nothing_until_enabled(clock: Clock) -> None:
    counters = Counters()
    book = ReceiptBook(FEATURES, 2, 5.0, counters)
    assert (book.enabled, book.upto, book.held, book.last_progress) == (False, -1, {}, 1000.0)
    assert (book.features_topic, book.max_unreceipted, book.timeout_s) == (FEATURES, 2, 5.0)
    assert not book.full(5)  # disabled: never back-pressure
    book.hold((0, FEATURES, b"a", None))
    clock.now = 1003.0
    book.set_enabled(True)
    assert book.last_progress == 1003.0 and book.enabled
    book.set_enabled(True)  # already on: the progress mark does not move
    clock.now = 1004.0
    book.set_enabled(True)
    assert book.last_progress == 1003.0


def test_full_is_held_plus_inflight_at_the_limit(clock: Clock) -> None:
    book, _ = _book(limit=3)
    assert not book.full(2) and book.full(3)
    book.hold((0, FEATURES, b"a", None))
    assert not book.full(1) and book.full(2)


def test_a_held_message_is_not_missing_by_itself(clock: Clock) -> None:
    book, counters = _book(timeout=1000.0)
    book.hold((0, FEATURES, b"a", None))
    clock.now += 10.0
    assert book.due() == [] and counters["resent"] == 0


def test_missing_goes_at_exactly_the_grace_after_its_puback(clock: Clock) -> None:
    book, counters = _book(timeout=1000.0)
    book.hold((0, FEATURES, b"a", None))
    book.hold((1, FEATURES, b"b", None))
    clock.now = 1000.5
    assert book.apply(Receipt("d", 1, (0,))) == []
    assert counters["receipted"] == 1 and list(book.held) == [0]
    clock.now = 1000.85  # (checks at least CHECK_EVERY_S apart: the throttle is tested below)
    assert book.due() == []
    clock.now = 1001.0
    assert book.due() == [(0, [(FEATURES, b"a")])] and counters["resent"] == 1
    assert book.held == {}


def test_due_is_throttled_between_receipts(clock: Clock) -> None:
    book, _ = _book(timeout=1000.0)
    book.hold((0, FEATURES, b"a", None))
    book.hold((1, FEATURES, b"b", None))
    clock.now = 1000.95
    assert book.apply(Receipt("d", 1, (0,))) == []  # checked at 1000.95: next check not before 1001.05
    clock.now = 1001.0
    assert book.due() == []  # due by the grace, but the throttle holds it
    clock.now = 1001.04
    assert book.due() == []
    clock.now = 1001.06
    assert _seqs(book.due()) == [0]
    book.hold((2, FEATURES, b"c", None))
    book.hold((0, FEATURES, b"a", None))
    clock.now = 1001.06
    assert book.apply(Receipt("d", 2, (0,))) == []  # a receipt resets the throttle, but 0 is in its grace
    clock.now = 1002.06
    assert _seqs(book.due()) == [0]


def test_overtaken_only_by_a_later_puback(clock: Clock) -> None:
    book, _ = _book(timeout=1000.0)
    for seq in range(4):
        book.hold((seq, FEATURES, b"%d" % seq, None))
    # the receipt covers 2 (acknowledged third): 0 and 1 were acknowledged before it and are not covered
    clock.now = 1001.0
    assert _seqs(book.apply(Receipt("d", 2, (0, 1)))) == [0, 1]
    assert list(book.held) == [3]  # 3 came after 2: not overtaken
    clock.now = 1010.0
    assert book.due() == []


def test_progress_only_when_upto_rises(clock: Clock) -> None:
    book, _ = _book(timeout=5.0)
    book.hold((5, FEATURES, b"a", None))
    book.hold((6, FEATURES, b"b", None))
    clock.now = 1002.0
    book.apply(Receipt("d", 4))
    assert book.upto == 4 and book.last_progress == 1002.0
    clock.now = 1003.0
    book.apply(Receipt("d", 4))  # the same upto again: no progress
    book.apply(Receipt("d", 3))  # lower: no progress either
    assert book.upto == 4 and book.last_progress == 1002.0
    clock.now = 1006.85
    assert book.due() == []
    clock.now = 1007.0  # exactly timeout_s after the last progress: the oldest goes as a probe
    assert _seqs(book.due()) == [5]


def test_probes_double_up_to_the_cap(clock: Clock) -> None:
    book, counters = _book(timeout=1.0)
    book.hold((0, FEATURES, b"a", None))
    t = 1000.0
    expected = []
    # waits 1, 2, 4, 8, 16, 32, then 32 again (2**5 cap)
    for wait in (1, 2, 4, 8, 16, 32, 32):
        clock.now = t + wait - 0.15
        assert book.due() == []
        clock.now = t + wait
        got = book.due()
        assert _seqs(got) == [0], wait
        book.hold((0, FEATURES, b"a", None))  # the probe's PUBACK
        expected.append(0)
        t += wait
    assert counters["resent"] == len(expected)


def test_a_probe_waits_for_the_oldest_to_be_timeout_old(clock: Clock) -> None:
    book, _ = _book(timeout=5.0)
    clock.now = 1004.0
    book.hold((0, FEATURES, b"a", None))  # acknowledged 4 s after the last progress
    clock.now = 1005.0
    assert book.due() == []  # no progress for 5 s, but 0 is only 1 s old
    clock.now = 1008.85
    assert book.due() == []
    clock.now = 1009.0
    assert _seqs(book.due()) == [0]


def test_the_oldest_by_puback_order_is_the_probe(clock: Clock) -> None:
    book, _ = _book(timeout=5.0)
    book.hold((7, FEATURES, b"a", None))
    book.hold((3, FEATURES, b"b", None))  # a lower seq acknowledged later (a re-send)
    clock.now = 1005.0
    assert _seqs(book.due()) == [7]


def test_missing_first_then_no_probe_in_the_same_check(clock: Clock) -> None:
    book, _ = _book(timeout=1.0)
    book.hold((0, FEATURES, b"a", None))
    book.hold((1, FEATURES, b"b", None))
    book.hold((2, FEATURES, b"c", None))
    clock.now = 1001.0
    # 1 missing and due by its grace: it goes, and the stalled-edge probe does not add the oldest
    assert _seqs(book.apply(Receipt("d", 0, ()))) == []  # progress to upto 0 at 1001
    book._next_check = 0.0
    assert book.due() == []
    clock.now = 1002.0
    assert _seqs(book.apply(Receipt("d", 2, (1,)))) == [1]


def test_a_config_turns_holding_on_and_off(clock: Clock) -> None:
    book, _ = _book()
    book.hold((0, FEATURES, b"a", None))
    book.set_enabled(False)
    assert book.held == {} and not book.enabled


def test_a_first_receipt_up_to_zero_is_progress(clock: Clock) -> None:
    book, _ = _book(timeout=5.0)
    book.hold((0, FEATURES, b"a", None))
    book.hold((1, FEATURES, b"b", None))
    clock.now = 1003.0
    book.apply(Receipt("d", 0))
    assert book.upto == 0 and book.last_progress == 1003.0 and list(book.held) == [1]


def test_due_takes_the_time_it_is_given_and_an_empty_book_owes_nothing(clock: Clock) -> None:
    book, _ = _book(timeout=5.0)
    clock.now = 2000.0
    assert book.due() == []  # nothing held, long after the last progress
    book.hold((4, FEATURES, b"a", None))  # acknowledged at 2000
    assert book.due(2004.0) == []  # the time given, not the clock's
    assert _seqs(book.due(2005.0)) == [4]
