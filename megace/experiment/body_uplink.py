"""A compressed uplink for the personal body: what lets megace share it at LoRA-like traffic.

Why: the horizon run (reports/experiment-fleet-horizon.md) shows FedAvg-FT, which shares every trainable
tensor and fine-tunes the fleet's model on the site, beating training alone by several points where megace,
whose body (embeddings, cross-modal block, head) never leaves the edge, does not. FedAvg-FT uploads about
20x megace's bytes. Here each edge uploads only a rank-``rank`` approximation of how far its round moved each
body matrix from the round's start (the fleet's model, identical on every edge), with error feedback
(the part left out is added to the next round's update, as PowerSGD does), as float16 or int8 numbers. Vectors
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

BITS = (32, 16, 8)


@dataclass(frozen=True)
class BodyUplink:
    """How the personal body (and the LoRA adapter beside it) travel to the cloud (``rank`` 0: uncompressed)."""

    rank: int = 0
    bits: int = 16
    """32: exact; 16: float16; 8: int8 with one float16 scale per row or column (along the shorter side). The
    rounding is part of the approximation, so error feedback carries it into the next round as well."""

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ValueError(f"rank must be >= 0, got {self.rank}")
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {self.bits}")

    @property
    def active(self) -> bool:
        return self.rank > 0


def quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, int]:
    """``x`` as it arrives after travelling at ``bits``, and the bytes it takes.

    int8 is symmetric (``round(x / scale)`` in [-127, 127]) with a float16 scale per slice of the shorter side:
    a rank-r factor (m x r or r x n) and a LoRA matrix get r scales, a vector one."""
    x = x.detach().float()
    if bits == 32:
        return x.clone(), 4 * x.numel()
    if bits == 16:
        return x.half().float(), 2 * x.numel()
    if x.ndim == 2:
        amax = x.abs().amax(dim=1 if x.shape[0] <= x.shape[1] else 0, keepdim=True)
    else:
        amax = x.abs().max().reshape([1] * x.ndim)
    scale = (amax / 127).half().float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all zeros, or below float16's range
    return torch.clamp(torch.round(x / scale), -127, 127) * scale, x.numel() + 2 * scale.numel()


def low_rank(delta: torch.Tensor, rank: int, bits: int = 32) -> tuple[torch.Tensor, int]:
    """The best rank-``rank`` approximation of a matrix (truncated SVD, factors travelling at ``bits``) and the
    bytes that travel; a matrix too small to gain travels whole."""
    rows, cols = delta.shape
    if rank * (rows + cols) >= rows * cols:
        return quantize(delta, bits)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    left, n_left = quantize(u[:, :rank] * s[:rank].sqrt(), bits)
    right, n_right = quantize(s[:rank].sqrt()[:, None] * vh[:rank], bits)
    return left @ right, n_left + n_right


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
        out: dict[str, torch.Tensor] = {}
        nbytes = 0
        for name, now in tensors.items():
            start = self._start[name]
            delta = now.detach().float().cpu() - start + self._residual.get(name, 0.0)
            if delta.ndim == 2:
                approx, n = low_rank(delta, self.uplink.rank, self.uplink.bits)
            else:
                approx, n = quantize(delta, self.uplink.bits)
            self._residual[name] = delta - approx
            out[name] = start + approx
            nbytes += n
        return out, nbytes


__all__ = ["BITS", "BodyCompressor", "BodyUplink", "low_rank", "quantize"]
