"""The ``receipt`` body, byte for byte: exact error classes and texts for each malformed field, and the bounds.

Why: a receipt releases records a device holds; a decoder that lets a malformed one through (or refuses a valid
one at a bound) either drops data or re-sends for ever. Bodies are built as raw msgpack, as the bus delivers them.
"""

from __future__ import annotations

import re

import msgpack
import pytest

from broker import topics
from broker.errors import DecodeError, TopicError
from broker.wire.receipt import MAX_MISSING, Receipt

ORDER = "receipt missing seqs must be ascending, unique, >= 0 and below upto"


def _wire(body: object) -> object:
    """What a receiver decodes: the body through msgpack, as it crossed the bus."""
    return msgpack.unpackb(msgpack.packb(body, use_bin_type=True), raw=False)


def _refused(body: object, text: str) -> None:
    with pytest.raises(DecodeError) as info:
        Receipt.from_body(_wire(body))
    assert type(info.value) is DecodeError
    assert str(info.value) == text


def test_the_bound_is_256() -> None:
    assert MAX_MISSING == 256


def test_to_body_is_exactly_the_three_fields_with_plain_ints() -> None:
    body = Receipt("dev-1", 9, (0, 4, 8)).to_body()
    assert body == {"device": "dev-1", "upto": 9, "missing": [0, 4, 8]}
    assert type(body["upto"]) is int and all(type(s) is int for s in body["missing"])
    assert Receipt("d", 0).to_body() == {"device": "d", "upto": 0, "missing": []}


def test_to_body_refuses_what_from_body_would_refuse() -> None:
    with pytest.raises(DecodeError, match=r"^receipt upto must be >= 0, got -1$"):
        Receipt("d", -1).to_body()
    with pytest.raises(DecodeError, match=r"^a receipt lists at most 256 missing seqs$"):
        Receipt("d", 10_000, tuple(range(257))).to_body()
    with pytest.raises(DecodeError, match="^" + re.escape(ORDER) + "$"):
        Receipt("d", 5, (5,)).to_body()
    with pytest.raises(TopicError, match=r"^invalid device 'a/b': "):
        Receipt("a/b", 5).to_body()
    # exactly the bound is fine
    assert len(Receipt("d", 10_000, tuple(range(256))).to_body()["missing"]) == 256


def test_valid_edges_decode() -> None:
    assert Receipt.from_body(_wire({"device": "d", "upto": 0})) == Receipt("d", 0, ())
    # seq 0 may be missing (the first seq); upto-1 may be missing; both at once
    assert Receipt.from_body(_wire({"device": "d", "upto": 5, "missing": [0, 4]})) == Receipt("d", 5, (0, 4))
    got = Receipt.from_body(_wire({"device": "d", "upto": 1000, "missing": list(range(256))}))
    assert got.missing == tuple(range(256)) and got.upto == 1000 and got.device == "d"
    assert isinstance(got.missing, tuple)
    # an explicit nil list is no missing seqs
    assert Receipt.from_body(_wire({"device": "d", "upto": 3, "missing": None})) == Receipt("d", 3, ())


def test_not_a_map() -> None:
    _refused([1, 2], "receipt body must be a map")


def test_bad_devices_are_decode_errors_with_the_topic_text() -> None:
    for device in ("", "a.b", "x" * 65):
        with pytest.raises(TopicError) as expected:
            topics.check_id(device, "device")
        _refused({"device": device, "upto": 1}, str(expected.value))
    _refused({"upto": 1}, "missing field 'device'")
    _refused({"device": 7, "upto": 1}, "field 'device' has the wrong type int")


def test_bad_upto() -> None:
    _refused({"device": "d", "upto": -1}, "field 'upto' must be >= 0, got -1")
    _refused({"device": "d", "upto": True}, "field 'upto' must be an integer")
    _refused({"device": "d"}, "missing field 'upto'")
    _refused({"device": "d", "upto": None}, "missing field 'upto'")
    _refused({"device": "d", "upto": "3"}, "field 'upto' has the wrong type str")


def test_missing_list_bounds_and_types() -> None:
    _refused({"device": "d", "upto": 10_000, "missing": list(range(257))},
             "a receipt lists at most 256 missing seqs, got 257")
    _refused({"device": "d", "upto": 5, "missing": [1, "2"]}, "receipt missing seqs must be integers")
    _refused({"device": "d", "upto": 5, "missing": [1.0]}, "receipt missing seqs must be integers")
    _refused({"device": "d", "upto": 5, "missing": [1, False]}, "receipt missing seqs must be integers")
    _refused({"device": "d", "upto": 5, "missing": [None]}, "receipt missing seqs must be integers")
    _refused({"device": "d", "upto": 5, "missing": "3"}, "field 'missing' has the wrong type str")


@pytest.mark.parametrize("missing", [[-1], [3, 2], [2, 2], [5], [6], [0, 5], [1, 4, 4]])
def test_missing_order_and_range(missing: list[int]) -> None:
    _refused({"device": "d", "upto": 5, "missing": missing}, ORDER)


def test_nothing_can_be_missing_below_upto_zero() -> None:
    _refused({"device": "d", "upto": 0, "missing": [0]}, ORDER)


def test_covers_at_the_edges() -> None:
    r = Receipt("d", 5, (0, 3))
    assert [s for s in range(8) if r.covers(s)] == [1, 2, 4, 5]
    assert Receipt("d", 0).covers(0) and not Receipt("d", 0).covers(1)
