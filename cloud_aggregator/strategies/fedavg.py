"""FedAvg / FedIT: sample-weighted average of A and of B, separately."""

from __future__ import annotations

import numpy as np

from .base import ModuleStack, Strategy, weighted_sum


class FedAvg(Strategy):
    """Averages the factors, not the products: cheap, but Σ w B · Σ w A ≠ Σ w BA (the known FedIT bias).

    Heterogeneous ranks are zero-padded to the largest, which is exact per edge.
    """

    name = "fedavg"

    def aggregate_module(self, stack: ModuleStack) -> tuple[np.ndarray | None, np.ndarray | None]:
        w = stack.normalized
        a = weighted_sum(w, stack.a) if stack.a is not None else None
        b = weighted_sum(stack.b_coefficients(w), stack.b) if stack.b is not None else None
        return a, b
