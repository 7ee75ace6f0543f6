"""Parsing peft state-dict names.

peft names a LoRA pair ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` (sometimes
with an adapter name, ``<module>.lora_A.default.weight``).  A module tied to one modality
carries ``.modality_proj.<modality>.`` in its name; the parser for that lives in the bus
contract (``broker.wire.adapters.modality_of``) so edges and cloud cannot disagree on it.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Literal

from broker.wire.adapters import modality_of as wire_modality_of

_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<kind>[AB])(?:\.[^.]+)?\.weight$")


@lru_cache(maxsize=65536)
def modality_of(name: str) -> str | None:
    """The modality a tensor or module is tied to, or None for modality-agnostic ones (cached).

    Accepts module names too: peft's module for a modality projection is
    ``...modality_proj.<m>`` itself, which ends at the modality level, so a dot is appended
    before matching the bus contract's ``.modality_proj.<m>.`` pattern.
    """
    return wire_modality_of(name if name.endswith(".") else name + ".")


@lru_cache(maxsize=65536)
def split_lora(name: str) -> tuple[str, Literal["A", "B"]] | None:
    """``(module, "A"|"B")`` for a LoRA factor name, None for any other tensor."""
    m = _LORA.match(name)
    if m is None:
        return None
    kind = m.group("kind")
    return m.group("module"), ("A" if kind == "A" else "B")


def lora_a(module: str) -> str:
    return f"{module}.lora_A.weight"


def lora_b(module: str) -> str:
    return f"{module}.lora_B.weight"
