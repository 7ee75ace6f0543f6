"""Assertions for the wire contract: a malformed input must raise one specific error class."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest


@contextmanager
def raises_exactly(cls: type[BaseException], message: str | None = None) -> Iterator[pytest.ExceptionInfo]:
    """Like ``pytest.raises(cls)`` but a subclass of ``cls`` does not count, and ``message`` (if given)
    must be the whole error text: receivers count rejects by class name and relay the text to devices."""
    with pytest.raises(cls) as info:
        yield info
    assert type(info.value) is cls, f"expected {cls.__name__}, got {type(info.value).__name__}: {info.value}"
    if message is not None:
        assert str(info.value) == message
