"""The real backbone: bundled all-MiniLM-L6-v2, loaded offline; shared part within the upload budget."""

from __future__ import annotations

import os

import torch

from edge_agent.training.toy_task import ToyTask, toy_config
from megace_model.adapters import build_edge_model, parameter_counts, shared_fraction, shared_state
from megace_model.batch import collate
from megace_model.config import ModalitySpec

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_minilm_shared_fraction_within_half_percent() -> None:
    config = toy_config(
        backbone="minilm",
        lora_r=8,
        modalities={"imu": ModalitySpec(token_dim=6, max_tokens=16), "audio": ModalitySpec(token_dim=64, max_tokens=8)},
    )
    model = build_edge_model(config)
    counts = parameter_counts(model)
    fraction = shared_fraction(model)
    print(f"MiniLM r=8: {counts} shared fraction {100 * fraction:.3f}%")
    assert counts["total"] > 22_000_000
    assert fraction <= 0.005
    shared = shared_state(model)
    assert sum(t.numel() for t in shared.values()) == counts["shared"]
    assert len([k for k in shared if ".backbone.encoder.layer." in k]) == 6 * 2 * 2  # 6 layers, q+v, A+B
    assert any(".modality_proj.audio." in k for k in shared)
    model.eval()
    batch = collate(ToyTask(config).samples(3), config)
    with torch.no_grad():
        logits = model(**batch.model_inputs()).logits
    assert logits.shape == (3, config.num_classes) and torch.isfinite(logits).all()
