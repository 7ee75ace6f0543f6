"""Aggregation rules, one class per rule, chosen by name: ``get_strategy("flora")``."""

from __future__ import annotations

from .base import ModuleStack, Strategy
from .fedavg import FedAvg
from .fedsa import FedSA
from .flexlora import FlexLoRA
from .flora import FLoRA
from .hetlora import HetLoRA
from .median import Median
from .modality_aware import ModalityAware
from .norm_clip import NormClip
from .trimmed_mean import TrimmedMean

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (FedAvg, HetLoRA, FLoRA, FlexLoRA, FedSA, ModalityAware, NormClip, TrimmedMean, Median)
}


def get_strategy(name: str, **config: object) -> Strategy:
    """Instantiate a rule by its registry name; unknown names list the known ones."""
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; known: {sorted(STRATEGIES)}") from None
    return cls(**config)  # type: ignore[arg-type]


__all__ = [
    "STRATEGIES",
    "FLoRA",
    "FedAvg",
    "FedSA",
    "FlexLoRA",
    "HetLoRA",
    "Median",
    "ModalityAware",
    "ModuleStack",
    "NormClip",
    "Strategy",
    "TrimmedMean",
    "get_strategy",
]
