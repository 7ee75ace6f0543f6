"""At-least-once in, exactly-once out: the per-sender sequence guard."""

from __future__ import annotations

from broker.dedup import SequenceGuard


def test_new_numbers_pass_and_replays_do_not() -> None:
    g = SequenceGuard()
    assert g.accept("a", 0) and g.accept("a", 1) and g.accept("a", 2)
    assert not g.accept("a", 2) and not g.accept("a", 1) and not g.accept("a", 0)
    assert g.duplicates == 3 and g.gaps == 0
    assert g.last == {"a": 2}


def test_senders_are_independent() -> None:
    g = SequenceGuard()
    assert g.accept("a", 5) and g.accept("b", 1) and g.accept("b", 2)
    assert not g.accept("a", 5) and g.accept("a", 6)
    assert g.last == {"a": 6, "b": 2} and g.duplicates == 1


def test_gaps_are_counted_but_accepted() -> None:
    g = SequenceGuard()
    assert g.accept("a", 10)  # the first number seen is never a gap
    assert g.gaps == 0
    assert g.accept("a", 11) and g.gaps == 0
    assert g.accept("a", 13) and g.gaps == 1
    assert g.accept("a", 20) and g.gaps == 2
    assert g.last["a"] == 20
    assert not g.accept("a", 19) and g.gaps == 2 and g.duplicates == 1


def test_restored_state_is_copied_and_honoured() -> None:
    saved = {"a": 7}
    g = SequenceGuard(saved)
    assert not g.accept("a", 7) and g.accept("a", 8)
    assert saved == {"a": 7}  # the caller's dict is not modified
    assert SequenceGuard().last == {} and SequenceGuard(None).last == {}
    fresh = SequenceGuard()
    assert (fresh.duplicates, fresh.gaps) == (0, 0)
