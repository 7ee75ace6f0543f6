"""Token buckets per key: a burst, then the rate, per key, with a bounded number of keys."""

from __future__ import annotations

import pytest

from megace_common.ratelimit import TokenBuckets


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_a_burst_then_the_rate_per_key() -> None:
    clock = Clock()
    tb = TokenBuckets(rate=2.0, burst=3, clock=clock)
    assert [tb.allow("a") for _ in range(5)] == [True, True, True, False, False]
    assert tb.allow("b")  # another key has its own bucket
    clock.t += 0.5  # one token back for a (2 per second)
    assert [tb.allow("a") for _ in range(2)] == [True, False]
    clock.t += 10.0  # refills to the burst, never beyond
    assert [tb.allow("a") for _ in range(4)] == [True, True, True, False]
    assert tb.denied == 4


def test_rate_zero_allows_nothing_and_keys_are_bounded() -> None:
    assert not TokenBuckets(rate=0.0, burst=1).allow("a")
    clock = Clock()
    tb = TokenBuckets(rate=1.0, burst=1, max_keys=2, clock=clock)
    assert tb.allow("a") and tb.allow("b") and tb.allow("c")  # "a" (least recently used) is forgotten
    assert len(tb._buckets) == 2 and tb.allow("a")  # forgotten: a fresh burst, not a denial
    assert not tb.allow("c")


@pytest.mark.parametrize("args", [(-1.0, 1), (1.0, 0)])
def test_bad_settings_are_refused(args: tuple[float, int]) -> None:
    with pytest.raises(ValueError):
        TokenBuckets(*args)
