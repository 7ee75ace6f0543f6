"""A compressed uplink for the personal body: what lets megace share it at LoRA-like traffic.

Why: the horizon run (reports/experiment-fleet-horizon.md) shows FedAvg-FT, which shares every trainable
tensor and fine-tunes the fleet's model on the site, beating training alone by several points where megace,
whose body (embeddings, cross-modal block, head) never leaves the edge, does not. FedAvg-FT uploads about
20x megace's bytes. Here each edge uploads only a rank-``rank`` approximation of how far its round moved each
body matrix from the round's start (the fleet's model, identical on every edge), with error feedback
(the part left out is added to the next round's update, as PowerSGD does), optionally as float16. Vectors
(biases, norms, the CLS token) travel whole.

In the simulation the cloud's ``Strategy`` receives ``start + approximation`` (its average is FedAvg of the
approximated updates, since every edge starts from the same fleet model); the bytes counted are the factors'
(``m x r + r x n`` numbers per matrix), not the reconstructed tensor's. The product's wire has no factor
format yet: that is why this lives on the experiment side.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BodyUplink:
    """How the personal body is compressed on its way to the cloud (``rank`` 0: not at all)."""

    rank: int = 0
    fp16: bool = True  # the factors (and vectors) travel as float16; the rounding is part of the approximation

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ValueError(f"rank must be >= 0, got {self.rank}")

    @property
    def active(self) -> bool:
        return self.rank > 0


def low_rank(delta: torch.Tensor, rank: int, fp16: bool) -> tuple[torch.Tensor, int]:
    """The best rank-``rank`` approximation of a matrix (truncated SVD, factors rounded to float16 when asked)
    and the number of values that travel; a matrix too small to gain travels whole."""
    rows, cols = delta.shape
    if rank * (rows + cols) >= rows * cols:
        out = delta.half().float() if fp16 else delta.clone()
        return out, rows * cols
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    left, right = u[:, :rank] * s[:rank].sqrt(), s[:rank].sqrt()[:, None] * vh[:rank]
    if fp16:
        left, right = left.half().float(), right.half().float()
    return left @ right, rank * (rows + cols)


class BodyCompressor:
    """One edge's compressed uplink: the round's start, the error-feedback residuals, the approximation."""

    def __init__(self, uplink: BodyUplink) -> None:
        self.uplink = uplink
        self._start: dict[str, torch.Tensor] = {}
        self._residual: dict[str, torch.Tensor] = {}

    def start_round(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Record where this round starts (the fleet's model once one arrived, else the shared seeded init)."""
        self._start = {k: v.detach().float().cpu().clone() for k, v in tensors.items()}

    def compress(self, tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
        """``start + approximation(update + residual)`` for every tensor, and the bytes that travel."""
        if set(tensors) != set(self._start):
            raise ValueError("compress() before start_round(), or for other tensors")
        width = 2 if self.uplink.fp16 else 4
        out: dict[str, torch.Tensor] = {}
        values = 0
        for name, now in tensors.items():
            start = self._start[name]
            delta = now.detach().float().cpu() - start + self._residual.get(name, 0.0)
            if delta.ndim == 2:
                approx, n = low_rank(delta, self.uplink.rank, self.uplink.fp16)
            else:
                approx, n = (delta.half().float() if self.uplink.fp16 else delta.clone()), delta.numel()
            self._residual[name] = delta - approx
            out[name] = start + approx
            values += n
        return out, values * width


__all__ = ["BodyCompressor", "BodyUplink", "low_rank"]
