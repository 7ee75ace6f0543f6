"""Checkpoint round trip (model trainable params + optimizer) and typed errors on corruption."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_agent.training.checkpoint import META_FILE, TENSORS_FILE
from edge_agent.training.toy_task import ToyTask, toy_config
from edge_agent.training.trainer import Trainer
from megace_model.errors import CheckpointError

torch.set_num_threads(1)


def trained_trainer(seed: int = 0) -> tuple[Trainer, ToyTask]:
    config = toy_config()
    task = ToyTask(config, seed=seed)
    trainer = Trainer(config, device="cpu")
    for sample in task.samples(64):
        trainer.add_sample(sample)
    trainer.train_round(steps=5, batch_size=16)
    return trainer, task


def test_checkpoint_round_trip_restores_predictions_and_optimizer(tmp_path: Path) -> None:
    trainer, task = trained_trainer()
    trainer.save_checkpoint(tmp_path / "ckpt")
    probe = task.samples(8)
    want = [trainer.predict(s)[1] for s in probe]

    restored = Trainer(toy_config(), device="cpu")
    assert not np.allclose(restored.predict(probe[0])[1], want[0])  # fresh model differs
    restored.load_checkpoint(tmp_path / "ckpt")
    got = [restored.predict(s)[1] for s in probe]
    assert all(np.allclose(a, b, atol=1e-6) for a, b in zip(want, got, strict=True))
    assert restored.steps == trainer.steps == 5 and restored.rounds == 1
    a, b = trainer.optimizer.state_dict(), restored.optimizer.state_dict()
    assert a["state"].keys() == b["state"].keys() and len(a["state"]) > 0
    for idx in a["state"]:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(a["state"][idx][key], b["state"][idx][key])
    assert a["param_groups"][0]["lr"] == b["param_groups"][0]["lr"]


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "drop_tensors", "drop_meta", "bad_json"])
def test_corrupt_checkpoint_raises_typed_error_and_keeps_model(tmp_path: Path, damage: str) -> None:
    trainer, task = trained_trainer()
    path = trainer.save_checkpoint(tmp_path / "ckpt")
    tensors, meta = path / TENSORS_FILE, path / META_FILE
    if damage == "flip_byte":
        data = bytearray(tensors.read_bytes())
        data[len(data) // 2] ^= 0xFF
        tensors.write_bytes(bytes(data))
    elif damage == "truncate":
        tensors.write_bytes(tensors.read_bytes()[:100])
    elif damage == "drop_tensors":
        tensors.unlink()
    elif damage == "drop_meta":
        meta.unlink()
    else:
        meta.write_text(meta.read_text()[:-20])
    other = Trainer(toy_config(), device="cpu")
    probe = task.sample()
    before = other.predict(probe)[1]
    with pytest.raises(CheckpointError):
        other.load_checkpoint(path)
    assert np.array_equal(other.predict(probe)[1], before)


def test_checkpoint_of_other_base_is_rejected(tmp_path: Path) -> None:
    trainer, _ = trained_trainer()
    path = trainer.save_checkpoint(tmp_path / "ckpt")
    foreign = Trainer(toy_config(seed=9), device="cpu")
    with pytest.raises(CheckpointError, match="frozen base"):
        foreign.load_checkpoint(path)
    body = json.loads((path / META_FILE).read_text())
    assert body["meta"]["base_fingerprint"] == trainer.fingerprint


def test_state_dict_round_trip_in_memory_and_training_continues() -> None:
    trainer, _ = trained_trainer()
    state = trainer.state_dict()
    twin = Trainer(toy_config(), device="cpu")
    for sample in trainer.buffer.snapshot():
        twin.buffer.add(sample.device_id, sample.modalities, sample.label)
    twin.load_state_dict(state)
    metrics = twin.train_round(steps=3, batch_size=16)
    assert metrics["steps"] == 3 and np.isfinite(metrics["loss"])
    assert twin.steps == 8


def test_apply_global_resets_shared_optimizer_moments() -> None:
    trainer, _ = trained_trainer()
    shared_params = {id(p) for n, p in trainer.model.named_parameters() if ".lora_" in n}
    assert any(id(p) in shared_params for p in trainer.optimizer.state)
    trainer.apply_global({k: v + 0.1 for k, v in trainer.shared_state().items()})
    assert not any(id(p) in shared_params for p in trainer.optimizer.state)
    assert len(trainer.optimizer.state) > 0  # personal moments kept
