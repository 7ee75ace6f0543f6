"""Builders for synthetic adapters and contributions used by the cloud tests.

The cloud holds numpy arrays; the random values are drawn with torch's generator (tests may import
torch, the cloud service does not), so every seed gives the same adapters as before the numpy port.
"""

from __future__ import annotations

import numpy as np
import torch

from cloud_aggregator.contribution import Contribution


def make_adapter(
    rank: int,
    modules: dict[str, tuple[int, int]],
    seed: int,
    dtype: torch.dtype = torch.float64,
    extras: dict[str, tuple[int, ...]] | None = None,
) -> dict[str, np.ndarray]:
    """Random LoRA factors for ``modules`` (name -> (out, in)) plus optional plain tensors, as numpy arrays."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for m, (o, i) in modules.items():
        out[f"{m}.lora_A.weight"] = torch.randn(rank, i, generator=g, dtype=dtype)
        out[f"{m}.lora_B.weight"] = torch.randn(o, rank, generator=g, dtype=dtype)
    for n, shape in (extras or {}).items():
        out[n] = torch.randn(*shape, generator=g, dtype=dtype)
    return {n: t.numpy() for n, t in out.items()}


def make_contribution(
    edge: int,
    rank: int,
    modules: dict[str, tuple[int, int]],
    *,
    alpha: float | None = None,
    samples: int = 10,
    seed: int | None = None,
    modalities: dict[str, int] | None = None,
    seq: int = 1,
    base_version: int = 0,
    fingerprint: str = "base",
    extras: dict[str, tuple[int, ...]] | None = None,
) -> Contribution:
    return Contribution(
        edge_id=f"edge-{edge}",
        seq=seq,
        base_version=base_version,
        rank=rank,
        alpha=float(2 * rank if alpha is None else alpha),
        samples=samples,
        modalities=dict(modalities or {}),
        fingerprint=fingerprint,
        tensors=make_adapter(rank, modules, seed if seed is not None else 1000 + edge, extras=extras),
    )


def effective_delta(c: Contribution, module: str) -> np.ndarray:
    """The edge's effective ΔW = (alpha/r) B A."""
    return c.scaling * c.tensors[f"{module}.lora_B.weight"] @ c.tensors[f"{module}.lora_A.weight"]
