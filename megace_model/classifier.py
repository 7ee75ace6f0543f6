"""Multimodal classifier: modality projections -> cross-modal block -> pretrained encoder -> head.

Frozen base (identical on every node, seeded): ``modality_proj.<m>`` Linear
layers and the ``backbone``. Personal (trainable, never uploaded): modality and
position embeddings, CLS token, cross-modal block, head. Shared (uploaded):
LoRA on ``backbone`` query/value and on ``modality_proj.<m>`` (added by
``megace_model.adapters``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import BertModel

from megace_model.backbone import build_backbone
from megace_model.config import EdgeModelConfig
from megace_model.cross_modal import CrossModalBlock
from megace_model.seeding import seeded

#: Top-level module names that stay on the edge. Everything else is frozen base or LoRA.
PERSONAL_MODULES: tuple[str, ...] = (
    "modality_embed",
    "position_embed",
    "cls_token",
    "cross_modal",
    "head",
)


@dataclass
class ClassifierOutput:
    """Logits plus what the contrastive loss needs."""

    logits: torch.Tensor  # (B, C)
    pooled: dict[str, torch.Tensor]  # modality -> (B, H), mean of its projected tokens
    presence: torch.Tensor  # (B, M) bool, modality actually contributed >= 1 token


class MultimodalClassifier(nn.Module):
    """Classifier over a variable subset of modalities (missing ones are masked, never imputed)."""

    def __init__(self, config: EdgeModelConfig, backbone: BertModel | None = None) -> None:
        super().__init__()
        self.edge_config = config  # not `.config`: peft treats `.config` as a transformers config
        names = config.modality_names
        self.modality_names = names
        hidden = config.hidden_size
        # Frozen base first, each under its own seed (independent of the personal part).
        self.backbone = backbone if backbone is not None else build_backbone(config)
        if self.backbone.config.hidden_size != hidden:
            raise ValueError(f"backbone hidden {self.backbone.config.hidden_size} != config {hidden}")
        with seeded(config.seed, "modality_proj"):
            self.modality_proj = nn.ModuleDict({m: nn.Linear(config.modalities[m].token_dim, hidden) for m in names})
        with seeded(config.seed, "personal"):
            self.modality_embed = nn.Parameter(torch.randn(len(names), hidden) * 0.02)
            self.position_embed = nn.ParameterDict(
                {m: nn.Parameter(torch.randn(config.modalities[m].max_tokens, hidden) * 0.02) for m in names}
            )
            self.cls_token = nn.Parameter(torch.randn(1, 1, hidden) * 0.02)
            self.cross_modal = CrossModalBlock(hidden, config.cross_modal_heads)
            self.head = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, config.num_classes))
        segment = torch.cat(
            [torch.full((config.modalities[m].max_tokens,), i, dtype=torch.long) for i, m in enumerate(names)]
        )
        self.register_buffer("segment", segment, persistent=False)

    def forward(
        self,
        features: dict[str, torch.Tensor],
        token_mask: dict[str, torch.Tensor],
        presence: torch.Tensor,
    ) -> ClassifierOutput:
        """``features[m]`` (B, max_tokens_m, token_dim_m); ``token_mask[m]`` (B, max_tokens_m) bool;
        ``presence`` (B, M) bool in ``modality_names`` order. Absent modalities may hold any finite values.
        """
        tokens: list[torch.Tensor] = []
        valids: list[torch.Tensor] = []
        pooled: dict[str, torch.Tensor] = {}
        for i, name in enumerate(self.modality_names):
            valid = token_mask[name].bool() & presence[:, i : i + 1].bool()
            projected = self.modality_proj[name](features[name])
            weights = valid.unsqueeze(-1).to(projected.dtype)
            pooled[name] = (projected * weights).sum(1) / weights.sum(1).clamp_min(1.0)
            x = projected + self.modality_embed[i] + self.position_embed[name]
            tokens.append(x * weights)
            valids.append(valid)
        x = torch.cat(tokens, dim=1)
        valid = torch.cat(valids, dim=1)
        fused = self.cross_modal(x, valid, self.segment) * valid.unsqueeze(-1).to(x.dtype)
        batch = x.shape[0]
        embeds = torch.cat([self.cls_token.expand(batch, -1, -1), fused], dim=1)
        mask = torch.cat([torch.ones(batch, 1, dtype=torch.long, device=x.device), valid.long()], dim=1)
        hidden = self.backbone(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        logits = self.head(hidden[:, 0])
        present = torch.stack([v.any(dim=1) for v in valids], dim=1)
        return ClassifierOutput(logits=logits, pooled=pooled, presence=present)
