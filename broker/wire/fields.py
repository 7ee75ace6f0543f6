"""Checked access to the fields of a decoded message body.

Bodies come off the network, so every field is type-checked on the way in and a
bad one is a :class:`broker.errors.DecodeError` that names the field.
"""

from __future__ import annotations

import math
import re
from typing import Any

from broker.errors import DecodeError, UnknownModalityError

MODALITY = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


def body_map(body: Any, what: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise DecodeError(f"{what} body must be a map")
    return body


def get_str(body: dict[str, Any], key: str, *, optional: bool = False) -> str | None:
    return _get(body, key, str, optional)


def get_int(body: dict[str, Any], key: str, *, optional: bool = False, minimum: int | None = 0) -> int | None:
    value = _get(body, key, int, optional)
    if isinstance(value, bool):
        raise DecodeError(f"field {key!r} must be an integer")
    if value is not None and minimum is not None and value < minimum:
        raise DecodeError(f"field {key!r} must be >= {minimum}, got {value}")
    return value


def get_float(
    body: dict[str, Any], key: str, *, optional: bool = False, finite: bool = False, positive: bool = False
) -> float | None:
    """A number as a float; ``finite``/``positive`` for fields that feed arithmetic (rates, LoRA alpha)."""
    value = _get(body, key, (int, float), optional)
    if isinstance(value, bool):
        raise DecodeError(f"field {key!r} must be a number")
    if value is None:
        return None
    out = float(value)  # msgpack ints are at most 64-bit: no OverflowError here
    if (finite or positive) and not math.isfinite(out):
        raise DecodeError(f"field {key!r} must be finite, got {out!r}")
    if positive and out <= 0:
        raise DecodeError(f"field {key!r} must be > 0, got {out!r}")
    return out


def get_map(body: dict[str, Any], key: str, *, optional: bool = False) -> dict[str, Any]:
    value = _get(body, key, dict, optional)
    return {} if value is None else value


def get_list(body: dict[str, Any], key: str, *, optional: bool = False) -> list[Any]:
    value = _get(body, key, list, optional)
    return [] if value is None else value


def number_map(value: dict[str, Any], what: str) -> dict[str, float]:
    """A map of string keys to finite numbers (metrics, quality indicators)."""
    out: dict[str, float] = {}
    for k, v in value.items():
        if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float)):
            raise DecodeError(f"{what} must map strings to numbers")
        if not math.isfinite(v):
            raise DecodeError(f"{what}[{k!r}] is not finite")
        out[k] = float(v)
    return out


def count_map(value: dict[str, Any], what: str) -> dict[str, int]:
    """A map of modality names to non-negative counts."""
    out: dict[str, int] = {}
    for k, v in value.items():
        check_modality(k)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise DecodeError(f"{what}[{k!r}] must be a non-negative integer")
        out[k] = v
    return out


_VALID_MODALITIES: set[str] = set()
"""Names that already passed the syntax check (bounded; modality names are few)."""


def check_modality(name: Any, allowed: frozenset[str] | set[str] | None = None) -> str:
    """Validate a modality name (syntax, and membership in ``allowed`` if given)."""
    if type(name) is str and name in _VALID_MODALITIES:
        if allowed is not None and name not in allowed:
            raise UnknownModalityError(f"unknown modality {name!r}; expected one of {sorted(allowed)}")
        return name
    if not isinstance(name, str) or not MODALITY.fullmatch(name):
        raise UnknownModalityError(f"malformed modality name {name!r}: must match {MODALITY.pattern}")
    if allowed is not None and name not in allowed:
        raise UnknownModalityError(f"unknown modality {name!r}; expected one of {sorted(allowed)}")
    if type(name) is str:
        if len(_VALID_MODALITIES) >= 1024:
            _VALID_MODALITIES.clear()
        _VALID_MODALITIES.add(name)
    return name


def _get(body: dict[str, Any], key: str, types: type | tuple[type, ...], optional: bool) -> Any:
    if key not in body or body[key] is None:
        if optional:
            return None
        raise DecodeError(f"missing field {key!r}")
    value = body[key]
    if not isinstance(value, types):
        raise DecodeError(f"field {key!r} has the wrong type {type(value).__name__}")
    return value
