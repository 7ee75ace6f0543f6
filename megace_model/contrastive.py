"""Cross-modal contrastive alignment (InfoNCE), as in ML-ECS.

For every pair of modalities, the pooled representations of the *same* sample
are positives and those of other samples in the batch are negatives. Only
samples where both modalities are present take part, so missing modalities
never contribute fake pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import torch
import torch.nn.functional as F


def pair_info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE between rows of ``a`` and ``b`` (N, H); row i of each is a positive pair."""
    za = F.normalize(a, dim=-1)
    zb = F.normalize(b, dim=-1)
    logits = za @ zb.T / temperature
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def contrastive_loss(
    pooled: dict[str, torch.Tensor],
    presence: torch.Tensor,
    names: Sequence[str],
    temperature: float,
) -> torch.Tensor:
    """Mean InfoNCE over modality pairs with >= 2 samples having both present; 0 if there is none.

    ``presence`` is (B, M) bool in ``names`` order; ``pooled[m]`` is (B, H).
    """
    losses: list[torch.Tensor] = []
    for (i, m1), (j, m2) in combinations(enumerate(names), 2):
        both = presence[:, i] & presence[:, j]
        if int(both.sum()) < 2:
            continue
        losses.append(pair_info_nce(pooled[m1][both], pooled[m2][both], temperature))
    if not losses:
        anchor = next(iter(pooled.values()))
        return anchor.sum() * 0.0  # keeps the graph and device, contributes nothing
    return torch.stack(losses).mean()
