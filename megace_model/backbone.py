"""Builds the pretrained transformer used as fusion backbone (frozen, shared by all nodes)."""

from __future__ import annotations

import os

import torch
from transformers import BertConfig, BertModel
from transformers.utils import logging as hf_logging

from megace_model.config import BACKBONE_MAX_POSITIONS, EdgeModelConfig
from megace_model.seeding import seeded
from megace_model.weights import minilm_path

__all__ = ["build_backbone", "minilm_path", "tiny_bert_config"]


def tiny_bert_config() -> BertConfig:
    """Tiny BERT for tests/CI: hidden 128, 2 layers; dropout off so small tests learn fast."""
    return BertConfig(
        vocab_size=8,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=BACKBONE_MAX_POSITIONS["tiny"],
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def build_backbone(config: EdgeModelConfig) -> BertModel:
    """Deterministic backbone: seeded random init ('tiny') or the bundled MiniLM, loaded offline."""
    if config.backbone == "tiny":
        with seeded(config.seed, "backbone"):
            return BertModel(tiny_bert_config(), add_pooling_layer=False)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the unused pooler weights would print a load report on every build
    try:
        with seeded(config.seed, "backbone"):  # nothing random should happen; keep the caller's RNG intact anyway
            # float32 whatever the file stores (an fp16 carry copy loads back as float32, see weights.MINILM_DIR_ENV)
            return BertModel.from_pretrained(str(minilm_path()), add_pooling_layer=False, local_files_only=True,
                                             dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(previous)
