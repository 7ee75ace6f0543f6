"""What the bus contract and the device SDK need from Python 3.10+ / 3.11, available on 3.9.

Why: the device SDK and the part of the bus contract it imports ship to IoT gateways on Python 3.9
and 3.10 (Debian 11, Ubuntu 22.04, Yocto), as the ``megace-device-sdk`` distribution (``sdk/``).
Two features of newer Pythons are used by every message class there:

* ``enum.StrEnum`` (3.11): :class:`StrEnum` below is a ``str`` mixin enum whose ``str()`` and
  ``format()`` give the value, as ``enum.StrEnum``'s do (``f"{Kind.FEATURES}"`` is ``"features"``).
* ``@dataclass(slots=True)`` (3.10): :func:`slotted_dataclass` uses it where it exists, and on 3.9
  rebuilds the class with ``__slots__`` the way CPython 3.10 does, so instances behave the same
  (no ``__dict__``, no attributes outside the fields).

Only the standard library; ``tests/device_sdk/test_min_python.py`` checks the SDK's modules stay 3.9-clean.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING, Any, TypeVar

T = TypeVar("T")


class StrEnum(str, Enum):  # noqa: UP042 (enum.StrEnum is 3.11)
    """``enum.StrEnum`` on any Python: members are strings and print as their value."""

    __str__ = str.__str__  # type: ignore[assignment]
    __format__ = str.__format__  # type: ignore[assignment]

    @staticmethod
    def _generate_next_value_(name: str, start: int, count: int, last_values: list[Any]) -> str:
        return name.lower()  # what ``auto()`` gives in enum.StrEnum


NATIVE_SLOTS = sys.version_info >= (3, 10)
"""Whether ``dataclasses.dataclass`` takes ``slots=True`` itself."""


def _frozen_getstate(self: Any) -> list[Any]:
    return [getattr(self, f.name) for f in dataclasses.fields(self)]


def _frozen_setstate(self: Any, state: list[Any]) -> None:
    for f, value in zip(dataclasses.fields(self), state):  # noqa: B905 (strict= is 3.10)
        object.__setattr__(self, f.name, value)  # frozen: plain setattr would raise


def add_slots(cls: type[T], *, frozen: bool) -> type[T]:
    """A copy of dataclass ``cls`` with ``__slots__`` for its fields (CPython 3.10's ``_add_slots``).

    ``__slots__`` cannot be added to an existing class, so the class is created again from its namespace;
    as with CPython's own, methods that call ``super()`` without arguments would still name the old class.
    """
    if "__slots__" in cls.__dict__:
        raise TypeError(f"{cls.__name__} already specifies __slots__")
    namespace = dict(cls.__dict__)
    names = tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
    namespace["__slots__"] = names
    for name in names:
        namespace.pop(name, None)  # class-level defaults would clash with the slots; __init__ holds them
    namespace.pop("__dict__", None)
    namespace.pop("__weakref__", None)
    qualname = getattr(cls, "__qualname__", None)
    new = type(cls)(cls.__name__, cls.__bases__, namespace)
    if qualname is not None:
        new.__qualname__ = qualname
    if frozen:  # pickling a frozen class with slots needs these (no __dict__ to restore)
        new.__getstate__ = _frozen_getstate  # type: ignore[attr-defined]
        new.__setstate__ = _frozen_setstate  # type: ignore[attr-defined]
    return new


def _slotted_dataclass(*, frozen: bool = False, repr: bool = True) -> Callable[[type[T]], type[T]]:
    """``@dataclass(frozen=..., repr=..., slots=True)`` on Python 3.9 and later."""

    def wrap(cls: type[T]) -> type[T]:
        if NATIVE_SLOTS:
            return dataclasses.dataclass(cls, frozen=frozen, repr=repr, slots=True)  # novermin: 3.10+ only
        return add_slots(dataclasses.dataclass(cls, frozen=frozen, repr=repr), frozen=frozen)

    return wrap


if TYPE_CHECKING:  # type checkers know what @dataclass makes; the wrapper above is the same at run time
    from dataclasses import dataclass as slotted_dataclass
else:
    slotted_dataclass = _slotted_dataclass
