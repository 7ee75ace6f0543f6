"""Trainer: learns the toy multimodal task, predicts while a round runs, handles bad input."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from edge_agent.model.errors import InsufficientDataError, SampleError
from edge_agent.training.toy_task import ToyTask, toy_config
from edge_agent.training.trainer import Trainer

torch.set_num_threads(1)


def test_training_clearly_beats_chance_and_untrained_model() -> None:
    config = toy_config(contrastive_weight=0.1)
    task = ToyTask(config, seed=0)
    test_set = task.samples(200)
    trainer = Trainer(config, device="cpu")
    untrained = trainer.evaluate(test_set)["acc"]
    for sample in task.samples(300):
        trainer.add_sample(sample, device_id="dev-1")
    metrics = trainer.train_round(steps=60, batch_size=32)
    trained = trainer.evaluate(test_set)["acc"]
    chance = 1 / config.num_classes
    assert trained > chance + 0.35, (untrained, trained, metrics)
    assert trained > untrained + 0.25
    assert metrics["steps"] == 60 and metrics["skipped_steps"] == 0
    assert metrics["n_train"] == 240 and metrics["n_heldout"] == 60  # every 5th sample held out
    assert metrics["heldout_acc"] > chance + 0.3
    assert metrics["contrastive_loss"] > 0 and np.isfinite(metrics["loss"])
    label, probs = trainer.predict({"modalities": {"env": task.prototypes["env"][2]}})
    assert probs.shape == (4,) and abs(float(probs.sum()) - 1) < 1e-5 and label == int(probs.argmax())


def test_epochs_mode_and_missing_modality_training() -> None:
    config = toy_config()
    task = ToyTask(config, seed=1, keep_prob=0.3)  # mostly single-modality samples
    trainer = Trainer(config, device="cpu")
    for sample in task.samples(40):
        trainer.add_sample(sample)
    metrics = trainer.train_round(epochs=2, batch_size=16)
    assert metrics["steps"] == 2 * 2  # 32 training samples / 16 per batch, twice
    assert np.isfinite(metrics["loss"]) and metrics["round"] == 1


def test_bad_input_is_rejected_before_buffering() -> None:
    config = toy_config()
    trainer = Trainer(config, device="cpu")
    with pytest.raises(InsufficientDataError):
        trainer.train_round(steps=1)
    with pytest.raises(SampleError):
        trainer.add_sample({"modalities": {"env": np.zeros(5)}, "label": 0})
    with pytest.raises(SampleError):
        trainer.add_sample({"modalities": {"env": np.zeros(8)}, "label": -1})
    with pytest.raises(SampleError):
        trainer.predict({"modalities": {"radar": np.zeros(8)}})
    assert len(trainer.buffer) == 0


def test_predict_concurrently_with_training_round() -> None:
    config = toy_config()
    task = ToyTask(config, seed=2)
    trainer = Trainer(config, device="cpu")
    for sample in task.samples(100):
        trainer.add_sample(sample)
    errors: list[BaseException] = []
    results: list[tuple[int, np.ndarray]] = []
    done = threading.Event()

    def train() -> None:
        try:
            trainer.train_round(steps=25, batch_size=16)
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=train)
    thread.start()
    probe = task.sample()
    while not done.is_set() or len(results) < 3:
        results.append(trainer.predict(probe))
    thread.join()
    assert not errors
    assert all(np.isfinite(p).all() and abs(float(p.sum()) - 1) < 1e-5 for _, p in results)
    assert trainer.steps == 25
    assert trainer.model.training is False  # last op was a predict, which sets eval mode


def test_a_partial_view_replaces_only_what_it_carries() -> None:
    """A modality-aware site view omits modules of modalities the edge lacks; those keep their values."""
    trainer = Trainer(toy_config())
    before = trainer.shared_state()
    names = sorted(before)
    kept = [n for n in names if ".modality_proj." in n][:2]
    view = {n: torch.full_like(before[n], 0.5) for n in names if n not in kept}
    with pytest.raises(ValueError):
        trainer.apply_global(view)  # the whole global must be complete
    trainer.apply_global(view, strict=False)
    after = trainer.shared_state()
    assert kept and all(torch.equal(after[n], before[n]) for n in kept)
    assert all(torch.equal(after[n], view[n]) for n in view)
