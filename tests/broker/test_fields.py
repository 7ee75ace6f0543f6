"""Checked access to body fields: each helper's accept/reject rules and the error it raises."""

from __future__ import annotations

import math
from typing import Any

import pytest

from broker.errors import DecodeError, UnknownModalityError
from broker.wire import fields
from broker.wire.fields import (
    body_map,
    check_modality,
    count_map,
    get_float,
    get_int,
    get_list,
    get_map,
    get_str,
    number_map,
)
from tests.support.wire import raises_exactly

BODY: dict[str, Any] = {"s": "x", "i": 3, "zero": 0, "neg": -2, "f": 2.5, "b": True, "m": {"a": 1}, "l": [1],
                        "none": None, "big": 2**70}


def test_body_map() -> None:
    assert body_map(BODY, "thing") is BODY
    with raises_exactly(DecodeError, "thing body must be a map"):
        body_map([1], "thing")


def test_get_str() -> None:
    assert get_str(BODY, "s") == "x"
    assert get_str({"s": ""}, "s") == ""
    assert get_str(BODY, "missing", optional=True) is None
    assert get_str(BODY, "none", optional=True) is None
    with raises_exactly(DecodeError, "missing field 'missing'"):
        get_str(BODY, "missing")
    with raises_exactly(DecodeError, "missing field 'none'"):
        get_str(BODY, "none")
    with raises_exactly(DecodeError, "field 'i' has the wrong type int"):
        get_str(BODY, "i")
    with raises_exactly(DecodeError, "field 'i' has the wrong type int"):
        get_str(BODY, "i", optional=True)


def test_get_int() -> None:
    assert get_int(BODY, "i") == 3
    assert get_int(BODY, "zero") == 0
    assert get_int(BODY, "big") == 2**70
    assert get_int(BODY, "neg", minimum=None) == -2
    assert get_int(BODY, "neg", minimum=-2) == -2
    assert get_int(BODY, "i", minimum=3) == 3
    assert get_int(BODY, "missing", optional=True) is None
    assert get_int(BODY, "missing", optional=True, minimum=5) is None
    with raises_exactly(DecodeError, "field 'neg' must be >= 0, got -2"):
        get_int(BODY, "neg")
    with raises_exactly(DecodeError, "field 'i' must be >= 4, got 3"):
        get_int(BODY, "i", minimum=4)
    with raises_exactly(DecodeError, "field 'zero' must be >= 1, got 0"):
        get_int(BODY, "zero", minimum=1)
    with raises_exactly(DecodeError, "field 'b' must be an integer"):
        get_int(BODY, "b")
    with raises_exactly(DecodeError, "field 'b' must be an integer"):
        get_int({"b": False}, "b", optional=True, minimum=None)
    with raises_exactly(DecodeError, "field 'f' has the wrong type float"):
        get_int(BODY, "f")
    with raises_exactly(DecodeError, "field 's' has the wrong type str"):
        get_int(BODY, "s")
    with raises_exactly(DecodeError, "missing field 'missing'"):
        get_int(BODY, "missing")


def test_get_float() -> None:
    assert get_float(BODY, "f") == 2.5
    value = get_float(BODY, "i")
    assert value == 3.0 and type(value) is float
    assert get_float(BODY, "missing", optional=True) is None
    assert get_float(BODY, "none", optional=True) is None
    assert math.isnan(get_float({"x": math.nan}, "x"))  # type: ignore[arg-type]
    with raises_exactly(DecodeError, "field 'b' must be a number"):
        get_float(BODY, "b")
    with raises_exactly(DecodeError, "field 's' has the wrong type str"):
        get_float(BODY, "s")
    with raises_exactly(DecodeError, "missing field 'missing'"):
        get_float(BODY, "missing")


def test_get_map_and_list() -> None:
    assert get_map(BODY, "m") == {"a": 1}
    assert get_map(BODY, "m") is BODY["m"]
    assert get_map(BODY, "missing", optional=True) == {}
    assert get_map(BODY, "none", optional=True) == {}
    assert get_list(BODY, "l") is BODY["l"]
    assert get_list(BODY, "missing", optional=True) == []
    assert get_list(BODY, "none", optional=True) == []
    with raises_exactly(DecodeError, "missing field 'missing'"):
        get_map(BODY, "missing")
    with raises_exactly(DecodeError, "field 'l' has the wrong type list"):
        get_map(BODY, "l", optional=True)
    with raises_exactly(DecodeError, "missing field 'missing'"):
        get_list(BODY, "missing")
    with raises_exactly(DecodeError, "field 'm' has the wrong type dict"):
        get_list(BODY, "m", optional=True)


def test_number_map() -> None:
    out = number_map({"a": 1, "b": 2.5, "c": -0.0}, "q")
    assert out == {"a": 1.0, "b": 2.5, "c": -0.0}
    assert all(type(v) is float for v in out.values())
    assert number_map({}, "q") == {}
    for bad in ({1: 2.0}, {"a": True}, {"a": "1"}, {"a": None}, {"a": [1.0]}):
        with raises_exactly(DecodeError, "q must map strings to numbers"):
            number_map(bad, "q")
    for v in (math.inf, -math.inf, math.nan):
        with raises_exactly(DecodeError, "q['a'] is not finite"):
            number_map({"ok": 1.0, "a": v}, "q")


def test_count_map() -> None:
    assert count_map({"audio": 3, "imu": 0}, "mods") == {"audio": 3, "imu": 0}
    assert count_map({}, "mods") == {}
    for v in (-1, True, 1.0, "1", None):
        with raises_exactly(DecodeError, "mods['audio'] must be a non-negative integer"):
            count_map({"audio": v}, "mods")
    with raises_exactly(UnknownModalityError):
        count_map({"Audio": 1}, "mods")


@pytest.mark.parametrize("name", ["a", "audio", "imu_2", "x" * 32, "a0_"])
def test_good_modality_names(name: str) -> None:
    assert check_modality(name) == name
    assert check_modality(name, {name, "other"}) == name
    assert check_modality(name) == name  # the cached path agrees


@pytest.mark.parametrize("name", ["", "Audio", "2d", "_x", "a-b", "a b", "x" * 33, "é", "audio\n"])
def test_malformed_modality_names(name: str) -> None:
    msg = f"malformed modality name {name!r}: must match ^[a-z][a-z0-9_]{{0,31}}$"
    with raises_exactly(UnknownModalityError, msg):
        check_modality(name)
    with raises_exactly(UnknownModalityError, msg):
        check_modality(name, {name})


@pytest.mark.parametrize("name", [None, 3, b"audio", ["audio"], ("audio",)])
def test_non_string_modality_names(name: Any) -> None:
    with raises_exactly(UnknownModalityError, f"malformed modality name {name!r}: must match "
                                              "^[a-z][a-z0-9_]{0,31}$"):
        check_modality(name)


def test_allowed_modalities_are_enforced_cached_or_not() -> None:
    fields._VALID_MODALITIES.clear()
    msg = "unknown modality 'gps'; expected one of ['audio', 'imu']"
    with raises_exactly(UnknownModalityError, msg):
        check_modality("gps", frozenset({"imu", "audio"}))  # first sight: syntax checked, then membership
    assert "gps" not in fields._VALID_MODALITIES
    assert check_modality("gps") == "gps"
    assert "gps" in fields._VALID_MODALITIES
    with raises_exactly(UnknownModalityError, msg):
        check_modality("gps", {"imu", "audio"})  # cached name, still not allowed
    assert check_modality("gps", {"gps"}) == "gps"


def test_string_subclasses_are_checked_but_not_cached() -> None:
    class Name(str):
        pass

    fields._VALID_MODALITIES.clear()
    assert check_modality(Name("imu")) == "imu"
    assert not fields._VALID_MODALITIES
    with raises_exactly(UnknownModalityError):
        check_modality(Name("IMU"))


def test_modality_cache_is_bounded() -> None:
    fields._VALID_MODALITIES.clear()
    names = [f"m{i}" for i in range(1024)]
    for n in names:
        check_modality(n)
    assert len(fields._VALID_MODALITIES) == 1024
    check_modality("one_more")
    assert sorted(fields._VALID_MODALITIES) == ["one_more"]
    for i in range(3000):
        check_modality(f"n{i}")
        assert len(fields._VALID_MODALITIES) <= 1024
