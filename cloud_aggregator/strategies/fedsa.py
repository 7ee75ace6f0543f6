"""FedSA-LoRA (Guo et al. 2025): only A is shared; B stays personal on each edge.

A learns what is common across clients, B what is client-specific, so the cloud averages the
A's (sample-weighted) and never sends a B down.  Under the cloud's scaling convention A is
scale-free, so edges with different alpha/r can still share it.
"""

from __future__ import annotations

import numpy as np

from .base import ModuleStack, Strategy, weighted_sum


class FedSA(Strategy):
    name = "fedsa"
    shares_b = False

    def aggregate_module(self, stack: ModuleStack) -> tuple[np.ndarray | None, np.ndarray | None]:
        assert stack.a is not None
        return weighted_sum(stack.normalized, stack.a), None
