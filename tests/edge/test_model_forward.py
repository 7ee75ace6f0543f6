"""Forward pass, collation and base determinism of the edge multimodal model (tiny backbone)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edge_agent.training.toy_task import ToyTask, toy_config
from megace_model.adapters import build_edge_model
from megace_model.batch import collate
from megace_model.config import EdgeModelConfig, ModalitySpec
from megace_model.errors import ConfigError, SampleError
from megace_model.fingerprint import base_fingerprint, frozen_weights_digest

torch.set_num_threads(1)


def test_missing_modalities_give_finite_logits_and_gradients() -> None:
    config = toy_config()
    model = build_edge_model(config)
    task = ToyTask(config)
    samples = [
        task.sample(modalities=("imu",)),
        task.sample(modalities=("env",)),
        task.sample(modalities=("imu", "env")),
        {"modalities": {}, "label": 0},  # nothing present: CLS alone, still finite
    ]
    batch = collate(samples, config)
    assert batch.presence.tolist() == [[False, True], [True, False], [True, True], [False, False]]
    out = model(**batch.model_inputs())
    assert out.logits.shape == (4, config.num_classes)
    assert torch.isfinite(out.logits).all()
    torch.nn.functional.cross_entropy(out.logits, batch.labels).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_batch_of_single_modality_samples_only() -> None:
    config = toy_config()
    model = build_edge_model(config).eval()
    samples = ToyTask(config).samples(5, modalities=("env",))
    with torch.no_grad():
        out = model(**collate(samples, config).model_inputs())
    assert torch.isfinite(out.logits).all()
    assert out.presence[:, 0].all()  # "env" sorts first
    assert out.presence[:, 1].sum() == 0  # "imu" absent everywhere


def test_absent_modality_content_is_ignored() -> None:
    """Values under an absent presence bit must not change the prediction."""
    config = toy_config()
    model = build_edge_model(config).eval()
    batch = collate(ToyTask(config).samples(3, modalities=("env",)), config)
    with torch.no_grad():
        ref = model(**batch.model_inputs()).logits
        batch.features["imu"].normal_(std=100.0)
        batch.token_mask["imu"][:] = True  # presence still says absent
        noisy = model(**batch.model_inputs()).logits
    assert torch.allclose(ref, noisy, atol=1e-5)


def test_collate_pads_truncates_and_rejects_bad_samples() -> None:
    config = toy_config()
    long_imu = np.arange(10 * 6, dtype=np.float32).reshape(10, 6)
    batch = collate([{"modalities": {"imu": long_imu, "env": np.zeros(8)}, "label": 1}], config)
    assert batch.features["imu"].shape == (1, 4, 6)
    assert torch.equal(batch.features["imu"][0], torch.from_numpy(long_imu[-4:]))  # most recent tokens kept
    assert batch.token_mask["imu"].all() and batch.token_mask["env"].tolist() == [[True]]
    with pytest.raises(SampleError, match="unknown"):
        collate([{"modalities": {"lidar": np.zeros(3)}, "label": 0}], config)
    with pytest.raises(SampleError, match="shape"):
        collate([{"modalities": {"env": np.zeros(7)}, "label": 0}], config)
    with pytest.raises(SampleError, match="non-finite"):
        collate([{"modalities": {"env": np.full(8, np.nan)}, "label": 0}], config)
    with pytest.raises(SampleError, match="label"):
        collate([{"modalities": {"env": np.zeros(8)}, "label": 9}], config)


def test_frozen_base_is_deterministic_and_fingerprinted() -> None:
    config = toy_config()
    a, b = build_edge_model(config), build_edge_model(toy_config(num_classes=7))
    # Personal knobs (num_classes) change neither the frozen weights nor the fingerprint.
    assert frozen_weights_digest(a) == frozen_weights_digest(b)
    assert base_fingerprint(config) == base_fingerprint(toy_config(num_classes=7, lora_r=4))
    other_seed = toy_config(seed=1)
    assert frozen_weights_digest(build_edge_model(other_seed)) != frozen_weights_digest(a)
    assert base_fingerprint(other_seed) != base_fingerprint(config)
    wider = toy_config(modalities={"imu": ModalitySpec(7, 4), "env": ModalitySpec(8)})
    assert base_fingerprint(wider) != base_fingerprint(config)
    # Building must not disturb the caller's RNG stream.
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_edge_model(config)
    assert torch.equal(torch.rand(3), expected)


def test_config_round_trip_and_validation() -> None:
    config = toy_config(contrastive_weight=0.2)
    assert EdgeModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError):
        toy_config(modalities={"Bad.Name": ModalitySpec(3)})
    with pytest.raises(ConfigError):
        toy_config(modalities={"imu": ModalitySpec(6, 200)})  # longer than tiny's 128 positions
    with pytest.raises(ConfigError):
        EdgeModelConfig.from_dict({**config.to_dict(), "surprise": 1})
