"""Cross-modal attention: each modality's tokens attend to the *other* modalities' tokens.

This is the Multimodal Transformer (MulT) idea in one block. A learned "null"
key is always visible, so a token whose sample has no other modality present
still has a valid attention target: no all-masked softmax, hence no NaNs.
"""

from __future__ import annotations

import torch
from torch import nn


class CrossModalBlock(nn.Module):
    """Post-norm attention + feed-forward block with a modality-exclusion mask."""

    def __init__(self, hidden: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.attn = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.null_key = nn.Parameter(torch.zeros(1, 1, hidden))
        self.norm1 = nn.LayerNorm(hidden)
        self.ffn = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))
        self.norm2 = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
        """Fuse ``tokens`` (B, L, H).

        ``valid`` (B, L) marks real tokens; ``segment`` (L,) gives each position's
        modality index. Query i may see key j iff j is valid and from another modality.
        """
        batch, length, _ = tokens.shape
        keys = torch.cat([self.null_key.expand(batch, 1, -1), tokens], dim=1)
        other = segment[:, None] != segment[None, :]  # (L, L)
        allowed = other[None, :, :] & valid[:, None, :]  # (B, L, L)
        null_col = torch.ones(batch, length, 1, dtype=torch.bool, device=tokens.device)
        blocked = ~torch.cat([null_col, allowed], dim=2)  # True = may not attend
        blocked = blocked.repeat_interleave(self.heads, dim=0)
        attended, _ = self.attn(tokens, keys, keys, attn_mask=blocked, need_weights=False)
        hidden = self.norm1(tokens + self.dropout(attended))
        return self.norm2(hidden + self.dropout(self.ffn(hidden)))
