"""Modality-aware aggregation (ML-ECS style).

A module tied to a modality (``.modality_proj.<m>.`` in its name) is aggregated only over the
edges that saw samples of ``m``, weighted by how many; an edge without audio therefore cannot
dilute the audio modules.  Every module is aggregated and viewed by an inner rule (default
fedavg), and an edge only receives the modality modules it has data for.
"""

from __future__ import annotations

import numpy as np

from megace_common.lora import modality_of

from ..contribution import Contribution, GlobalState
from .base import ModuleStack, Strategy


class ModalityAware(Strategy):
    name = "modality-aware"

    def __init__(self, inner: Strategy | str = "fedavg", **inner_config: object) -> None:
        if isinstance(inner, str):
            from . import get_strategy

            inner = get_strategy(inner, **inner_config)
        if isinstance(inner, ModalityAware):
            raise ValueError("modality-aware cannot wrap itself")
        self.inner = inner
        self.factor_space = inner.factor_space  # type: ignore[misc]
        self.shares_a = inner.shares_a  # type: ignore[misc]
        self.shares_b = inner.shares_b  # type: ignore[misc]

    def base_weight(self, c: Contribution, name: str) -> float | None:
        mod = modality_of(name)
        if mod is None:
            return self.inner.base_weight(c, name)
        seen = c.modalities.get(mod, 0)
        return float(seen) if seen > 0 else None

    def aggregate_module(self, stack: ModuleStack) -> tuple[np.ndarray | None, np.ndarray | None]:
        return self.inner.aggregate_module(stack)

    def combine_extra(self, stack: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return self.inner.combine_extra(stack, weights)

    def view_modalities(self, modalities: dict[str, int] | None) -> frozenset[str] | None:
        """The modalities the edge has samples of (its modality modules are the only ones it receives)."""
        return None if modalities is None else frozenset(m for m, n in modalities.items() if n > 0)

    def own_views(self, g: GlobalState) -> set[str]:
        return self.inner.own_views(g)

    def view_module(self, g: GlobalState, module: str, rank: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        return self.inner.view_module(g, module, rank)
