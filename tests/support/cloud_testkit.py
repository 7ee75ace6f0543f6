"""Builders for synthetic adapters and contributions used by the cloud tests."""

from __future__ import annotations

import torch

from cloud_aggregator.contribution import Contribution


def make_adapter(
    rank: int,
    modules: dict[str, tuple[int, int]],
    seed: int,
    dtype: torch.dtype = torch.float64,
    extras: dict[str, tuple[int, ...]] | None = None,
) -> dict[str, torch.Tensor]:
    """Random LoRA factors for ``modules`` (name -> (out, in)) plus optional plain tensors."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for m, (o, i) in modules.items():
        out[f"{m}.lora_A.weight"] = torch.randn(rank, i, generator=g, dtype=dtype)
        out[f"{m}.lora_B.weight"] = torch.randn(o, rank, generator=g, dtype=dtype)
    for n, shape in (extras or {}).items():
        out[n] = torch.randn(*shape, generator=g, dtype=dtype)
    return out


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


def effective_delta(c: Contribution, module: str) -> torch.Tensor:
    """The edge's effective ΔW = (alpha/r) B A."""
    return c.scaling * c.tensors[f"{module}.lora_B.weight"] @ c.tensors[f"{module}.lora_A.weight"]
