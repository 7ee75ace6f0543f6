"""InfoNCE cross-modal alignment over pairs of present modalities."""

from __future__ import annotations

import torch

from edge_agent.training.toy_task import ToyTask, toy_config
from megace_model.adapters import build_edge_model
from megace_model.batch import collate
from megace_model.contrastive import contrastive_loss, pair_info_nce

torch.set_num_threads(1)


def test_aligned_pairs_score_lower_than_shuffled() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(16, 32, generator=gen)
    aligned = pair_info_nce(a, a + 0.05 * torch.randn(16, 32, generator=gen), 0.1)
    shuffled = pair_info_nce(a, a[torch.randperm(16, generator=gen)], 0.1)
    assert aligned < 0.1 < shuffled


def test_only_samples_with_both_modalities_count() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 8, generator=gen)
    pooled = {"a": x.clone(), "b": x.clone()}
    presence = torch.tensor([[1, 1], [1, 1], [1, 1], [1, 0], [0, 1], [1, 0]], dtype=torch.bool)
    base = contrastive_loss(pooled, presence, ("a", "b"), 0.1)
    # Garbage where a modality is absent must not change the loss.
    pooled["b"][3] = 1e3
    pooled["a"][4] = -1e3
    assert torch.allclose(contrastive_loss(pooled, presence, ("a", "b"), 0.1), base)
    assert torch.allclose(base, pair_info_nce(x[:3], x[:3], 0.1))
    lonely = torch.tensor([[1, 0], [0, 1], [1, 0]], dtype=torch.bool)
    zero = contrastive_loss({k: v[:3] for k, v in pooled.items()}, lonely, ("a", "b"), 0.1)
    assert zero.item() == 0.0


def test_contrastive_gradient_reaches_shared_modality_lora() -> None:
    config = toy_config(contrastive_weight=1.0)
    model = build_edge_model(config)
    batch = collate(ToyTask(config).samples(8, modalities=("imu", "env")), config)
    out = model(**batch.model_inputs())
    loss = contrastive_loss(out.pooled, out.presence, config.modality_names, config.contrastive_temperature)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    lora_a = dict(model.named_parameters())["base_model.model.modality_proj.imu.lora_A.default.weight"]
    lora_b = dict(model.named_parameters())["base_model.model.modality_proj.imu.lora_B.default.weight"]
    # lora_B starts at zero, so the first gradient lands on B.
    assert lora_b.grad is not None and lora_b.grad.abs().sum() > 0
    assert lora_a.requires_grad
