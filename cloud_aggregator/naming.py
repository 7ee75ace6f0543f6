"""Parsing peft state-dict names.

peft names a LoRA pair ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` (sometimes
with an adapter name, ``<module>.lora_A.default.weight``).  A module tied to one modality
carries ``.modality_proj.<modality>.`` in its name.  ``broker.wire.adapters.modality_of``
is meant to expose the same parser; this copy keeps the cloud free of a broker import.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Literal

_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<kind>[AB])(?:\.[^.]+)?\.weight$")
_MODALITY = re.compile(r"(?:^|\.)modality_proj\.(?P<modality>[^.]+)\.")


@lru_cache(maxsize=65536)
def modality_of(name: str) -> str | None:
    """The modality a tensor is tied to, or None for shared (modality-agnostic) tensors."""
    m = _MODALITY.search(name)
    return m.group("modality") if m else None


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
