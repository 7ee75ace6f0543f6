"""GapGuard's and RecentEnvelopes' bounds and bookkeeping, with expectations worked out by hand.

Why: the gap guard decides which late re-sends are accepted (a wrong hole set drops a record or accepts a
replay twice) and what a receipt reports missing; RecentEnvelopes decides which downlinks are repeats.
"""

from __future__ import annotations

import pytest

from broker.dedup import FOREIGN_MAX, GAPS_MAX, GapGuard, RecentEnvelopes, SequenceGuard


def test_constants() -> None:
    assert (GAPS_MAX, FOREIGN_MAX) == (1024, 64)
    assert GapGuard().max_gaps == 1024


def test_sequence_guard_seen_looks_without_recording() -> None:
    g = SequenceGuard({"a": 5})
    assert not g.seen("b", 0)
    assert g.seen("a", 5) and g.seen("a", 4) and not g.seen("a", 6)
    assert g.last == {"a": 5} and (g.duplicates, g.gaps) == (0, 0)
    assert g.accept("a", 6) and not g.accept("a", 6) and not g.accept("a", 2)
    assert g.accept("a", 9) and g.accept("a", 10)
    assert (g.duplicates, g.gaps, g.last) == (2, 1, {"a": 10})
    assert g.accept("b", 0) and g.last["b"] == 0


def test_restored_holes_drop_empty_lists_and_are_sets() -> None:
    g = GapGuard({"a": 9, "b": 4}, {"a": [3, 5], "b": []})
    assert g.holes == {"a": {3, 5}}
    assert (g.fills, g.abandoned, g.closed, g.duplicates, g.gaps) == (0, 0, 0, 0, 0)
    assert g.floors == {}
    assert g.seen("a", 4) and not g.seen("a", 3) and not g.seen("a", 10) and g.seen("b", 4)
    assert not g.seen("c", 0)


def test_a_gap_is_filled_once_each_and_then_forgotten() -> None:
    g = GapGuard()
    assert g.accept("a", 5) and g.gaps == 0 and g.holes == {}
    assert g.accept("a", 9) and g.gaps == 1 and g.holes == {"a": {6, 7, 8}}
    assert g.accept("a", 7) and g.fills == 1 and g.holes == {"a": {6, 8}}
    assert not g.accept("a", 7) and g.duplicates == 1
    assert not g.accept("a", 9) and g.duplicates == 2
    assert g.accept("a", 6) and g.accept("a", 8)
    assert g.fills == 3 and "a" not in g.holes
    assert g.accept("a", 10) and g.gaps == 1  # the next seq opens no gap
    assert g.last == {"a": 10}


def test_the_newest_max_gaps_are_kept_and_the_rest_counted_abandoned() -> None:
    g = GapGuard({"a": 0}, max_gaps=3)
    g.accept("a", 10)  # skips 1..9: keeps 7, 8, 9
    assert g.holes == {"a": {7, 8, 9}} and g.abandoned == 6
    g.accept("a", 12)  # skips 11: now 7 is the oldest over the bound
    assert g.holes == {"a": {8, 9, 11}} and g.abandoned == 7 and g.gaps == 2
    assert g.holes_dict() == {"a": [8, 9, 11]}


def test_foreign_seqs_are_not_gaps_nor_counted_lost() -> None:
    g = GapGuard({"a": 0}, max_gaps=2)
    g.foreign("a", 5)
    g.accept("a", 10)  # skips 1..9 less 5: eight lost seqs, keeps 8 and 9, abandons 6
    assert g.holes == {"a": {8, 9}} and g.abandoned == 6

    g = GapGuard({"a": 0})
    g.foreign("a", 3)
    g.foreign("a", 8)
    g.foreign("a", 20)
    g.accept("a", 10)
    assert g.holes == {"a": {1, 2, 4, 5, 6, 7, 9}} and g.abandoned == 0
    g.accept("a", 22)  # 20 was remembered past the first gap; 3 and 8 were used up
    assert g.holes["a"] == {1, 2, 4, 5, 6, 7, 9, 11, 12, 13, 14, 15, 16, 17, 18, 19, 21}


def test_foreign_inside_a_hole_closes_it_and_below_the_mark_is_ignored() -> None:
    g = GapGuard({"a": 0})
    g.accept("a", 4)
    g.foreign("a", 2)
    assert g.holes == {"a": {1, 3}}
    g.foreign("a", 1)
    g.foreign("a", 3)
    assert "a" not in g.holes
    g.foreign("a", 4)  # at the mark, not a hole: remembered nowhere
    g.accept("a", 7)
    assert g.holes == {"a": {5, 6}}
    g.foreign("b", 3)  # an unknown sender's foreign seq is remembered for its first gap
    g.accept("b", 1)
    g.accept("b", 5)
    assert g.holes["b"] == {2, 4}


def test_foreign_marks_are_bounded_oldest_first() -> None:
    g = GapGuard({"a": 99})
    for s in range(100, 100 + FOREIGN_MAX + 1):  # 100..164: 100 is dropped
        g.foreign("a", s)
    g.accept("a", 200)
    expected = {100} | set(range(165, 200))
    assert g.holes["a"] == expected and g.abandoned == 0


def test_floor_closes_the_gaps_below_and_opens_none_there() -> None:
    g = GapGuard({"a": 0})
    g.accept("a", 10)
    g.floor("a", 5)
    assert g.holes == {"a": {5, 6, 7, 8, 9}} and g.closed == 4 and g.floors == {"a": 5}
    g.floor("a", 3)  # lower: ignored
    assert g.floors == {"a": 5}  # (checked before the next call, which would set 5 again either way)
    g.floor("a", 5)  # same: ignored
    assert g.floors == {"a": 5} and g.closed == 4
    g.floor("a", 10)
    assert "a" not in g.holes and g.closed == 9
    g.floor("a", 20)
    g.accept("a", 25)  # 11..19 are below the floor: only 20..24 are gaps, none abandoned
    assert g.holes == {"a": {20, 21, 22, 23, 24}} and g.abandoned == 0
    g.floor("c", 20)
    g.accept("c", 0)
    g.accept("c", 10)  # a jump that stays below the floor: no gap, nothing counted lost
    assert "c" not in g.holes and g.abandoned == 0 and g.gaps == 3  # (a opened two)
    g.floor("b", 0)
    assert g.floors["b"] == 0 and "b" not in g.holes


def test_forget_drops_one_sender_entirely() -> None:
    g = GapGuard({"a": 0, "b": 0})
    g.accept("a", 3)
    g.accept("b", 3)
    g.floor("a", 2)
    g.foreign("a", 7)
    g.forget("a")
    assert "a" not in g.last and "a" not in g.holes and "a" not in g.floors
    assert g.holes == {"b": {1, 2}}
    g.accept("a", 5)
    g.accept("a", 9)
    assert g.holes["a"] == {6, 7, 8}  # 7 is no longer foreign
    g.forget("nobody")


def test_missing_for_a_receipt() -> None:
    g = GapGuard()
    assert g.missing("a", 5) == (None, [])
    g = GapGuard({"a": 10}, {"a": [2, 3, 4, 8]})
    assert g.missing("a", 4) == (10, [2, 3, 4, 8])
    assert g.missing("a", 3) == (7, [2, 3, 4])
    assert g.missing("a", 2) == (1, [])  # 3 and 4 are lost too: step back to below 2
    assert g.missing("a", 0) == (1, [])
    g = GapGuard({"a": 10}, {"a": [0, 1]})
    assert g.missing("a", 1) == (None, [])
    g = GapGuard({"a": 10}, {"a": [1, 2]})
    assert g.missing("a", 0) == (0, [])  # seq 0 arrived: a receipt up to 0
    g = GapGuard({"a": 10}, {"a": [5]})
    assert g.missing("a", 0) == (4, [])
    g = GapGuard({"a": 10}, {"a": [1, 5]})
    assert g.missing("a", 1) == (4, [1])


def test_recent_envelopes_capacity_and_eviction() -> None:
    with pytest.raises(ValueError, match=r"^capacity must be at least 1$"):
        RecentEnvelopes(0)
    assert RecentEnvelopes().capacity == 4096
    r = RecentEnvelopes(2)
    assert r.accept("e", 1, b"x") and r.accept("e", 2, b"y")
    assert not r.accept("e", 1, b"x") and r.duplicates == 1  # both still held at exactly capacity
    assert r.accept("e", 3, b"z")  # evicts the oldest, (e, 1)
    assert not r.accept("e", 2, b"y") and r.duplicates == 2
    assert r.accept("e", 1, b"x")  # forgotten: new again (evicts (e, 2))
    assert r.accept("e", 2, b"y")
    assert r.duplicates == 2


def test_recent_envelopes_key_is_sender_seq_and_bytes() -> None:
    r = RecentEnvelopes(1)
    assert r.accept("e", 1, b"x")
    assert not r.accept("e", 1, b"x")
    assert r.accept("e", 1, b"x2")  # seqs started over: other bytes, not a repeat
    assert r.accept("f", 1, b"x2")
    assert r.accept("f", 2, b"x2")
    one = RecentEnvelopes(1)
    assert one.accept("e", 1, b"a") and one.accept("e", 2, b"b") and one.accept("e", 1, b"a")
