"""Adapter naming rules and the LoRA scaling arithmetic, one home for the edge and the cloud.

Everything here is a fact about how peft names and scales LoRA, written down once:

* peft state-dict names of a LoRA pair are ``<module>.lora_A.weight`` (shape ``(r, in)``) and
  ``<module>.lora_B.weight`` (shape ``(out, r)``), sometimes with the adapter name in between
  (``<module>.lora_A.default.weight``);
* a wrapped model's own parameters appear under :data:`PEFT_PREFIX`;
* LoRA adds ``(alpha / r) · B @ A`` to a layer, so B factors move between a sender's and a
  receiver's ``alpha / r`` by one factor (:func:`rescale_b`).

The ``.modality_proj.<m>.`` pattern is part of the bus contract and stays in
:func:`broker.wire.adapters.modality_of`; :func:`modality_of` here only extends it to module
names, so edges and cloud cannot disagree on it. No torch import: the helpers work on any array
type with ``/`` (numpy arrays, torch tensors).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Literal, TypeVar

from broker.wire.adapters import modality_of as wire_modality_of

_Array = TypeVar("_Array")

PEFT_PREFIX = "base_model.model."
"""peft's prefix for the wrapped model's parameters: ``PeftModel.base_model`` (the LoRA model)
holds the user's model (``get_base_model()``) as ``.model``, so ``peft_model.named_parameters()``
names ``head.weight`` as ``base_model.model.head.weight``; ``get_peft_model_state_dict`` keeps it."""

_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<kind>[AB])(?:\.[^.]+)?\.weight$")
"""A LoRA factor: ``<module>.lora_A|B[.<adapter name>].weight`` (peft drops the adapter name in
``get_peft_model_state_dict`` but keeps it in ``state_dict``; both are accepted)."""


def add_peft_prefix(name: str) -> str:
    """``name`` as peft names it on the wrapped model (``head.weight`` -> ``base_model.model.head.weight``)."""
    return PEFT_PREFIX + name


def strip_peft_prefix(name: str) -> str:
    """``name`` as the un-wrapped model names it; a name without peft's prefix is returned as it is."""
    return name.removeprefix(PEFT_PREFIX)


@lru_cache(maxsize=65536)
def split_lora(name: str) -> tuple[str, Literal["A", "B"]] | None:
    """``(module, "A"|"B")`` for a LoRA factor name, None for any other tensor (cached)."""
    m = _LORA.match(name)
    if m is None:
        return None
    kind = m.group("kind")
    return m.group("module"), ("A" if kind == "A" else "B")


def lora_a(module: str) -> str:
    """The state-dict name of ``module``'s A factor (``(r, in)``)."""
    return f"{module}.lora_A.weight"


def lora_b(module: str) -> str:
    """The state-dict name of ``module``'s B factor (``(out, r)``)."""
    return f"{module}.lora_B.weight"


def is_lora_b(name: str) -> bool:
    """True for a LoRA B factor: the factor that carries the scaling when it is folded in."""
    parts = split_lora(name)
    return parts is not None and parts[1] == "B"


@lru_cache(maxsize=65536)
def modality_of(name: str) -> str | None:
    """The modality a tensor or module is tied to, or None for modality-agnostic ones (cached).

    Accepts module names too: peft's module for a modality projection is
    ``...modality_proj.<m>`` itself, which ends at the modality level, so a dot is appended
    before matching the bus contract's ``.modality_proj.<m>.`` pattern.
    """
    return wire_modality_of(name if name.endswith(".") else name + ".")


def lora_scaling(alpha: float, rank: int) -> float:
    """peft's LoRA scaling ``alpha / r`` (rsLoRA's ``alpha / √r`` is declared as ``alpha·√r``)."""
    return float(alpha) / rank


def b_factor(sent_scaling: float, own_scaling: float) -> float:
    """What B is multiplied by so that a pair made at ``sent_scaling`` means the same ``ΔW`` at ``own_scaling``.

    ``sent · B @ A == own · (B · sent / own) @ A``; A is untouched. Close to 1 means nothing to do.
    """
    return sent_scaling / own_scaling


def rescale_b(b: _Array, sent_scaling: float, own_scaling: float) -> _Array:
    """A B factor made at ``sent_scaling`` (its maker's ``alpha / r``; 1 for the cloud's global), made
    ready for a receiver whose LoRA applies ``own_scaling``: ``B · b_factor``. Any array type with ``/``.

    Computed as ``B / (own / sent)``: from the global (``sent == 1``) that is exactly ``B / (alpha / r)``,
    one correctly rounded division, the same on the cloud (views) and on an edge (a global it rescales).
    """
    return b / (own_scaling / sent_scaling)  # type: ignore[operator]
