"""Trainer: learns the toy multimodal task, predicts while a round runs, handles bad input."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edge_agent.training.replay import BufferedSample, ReplayBuffer
from edge_agent.training.toy_task import ToyTask, toy_config
from edge_agent.training.trainer import Trainer
from megace_model.batch import collate
from megace_model.errors import CheckpointError, InsufficientDataError, SampleError

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
    # the objective is cross-entropy plus the weighted contrastive term (the averages are linear in the steps)
    assert metrics["loss"] == pytest.approx(metrics["ce_loss"] + 0.1 * metrics["contrastive_loss"], rel=1e-5)
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


@dataclass(frozen=True)
class _GatedSample(BufferedSample):
    """A buffered sample whose ``as_sample`` (what ``train_round`` calls while it collates a batch,
    between two optimisation steps) can pause the training thread."""

    gate: Callable[[BufferedSample], None] | None = None

    def as_sample(self) -> dict[str, Any]:
        if self.gate is not None:
            self.gate(self)
        return super().as_sample()


class _GatedBuffer(ReplayBuffer):
    """A real replay buffer that hands the trainer gated samples."""

    def __init__(self, gate: Callable[[BufferedSample], None]) -> None:
        super().__init__()
        self.gate = gate

    def snapshot(self) -> list[BufferedSample]:
        return [_GatedSample(s.seq, s.device_id, s.modalities, s.label, gate=self.gate) for s in super().snapshot()]


def test_a_prediction_completes_in_the_middle_of_a_training_round() -> None:
    """Training pauses between steps 3 and 4 until a prediction has come back: it only can if the
    trainer releases the model between steps (a lock held for the whole round deadlocks here)."""
    config = toy_config()
    task = ToyTask(config, seed=2)
    between_steps, predicted = threading.Event(), threading.Event()
    seen: dict[str, Any] = {}
    trainer: Trainer

    def gate(_: BufferedSample) -> None:
        if trainer.steps == 3 and not between_steps.is_set():
            between_steps.set()
            seen["resumed"] = predicted.wait(timeout=60)

    trainer = Trainer(config, buffer=_GatedBuffer(gate), device="cpu")
    for sample in task.samples(100):
        trainer.add_sample(sample)
    probe = task.sample()

    def predict_mid_round() -> None:
        try:
            if between_steps.wait(timeout=60):
                label, probs = trainer.predict(probe)
                seen.update(label=label, probs=probs, steps=trainer.steps)
        except BaseException as exc:  # surfaced below; training must not wait for a prediction that failed
            seen["error"] = exc
        finally:
            predicted.set()

    predictor = threading.Thread(target=predict_mid_round)
    predictor.start()
    try:
        metrics = trainer.train_round(steps=10, batch_size=16)
    finally:
        between_steps.set()
        predicted.set()
        predictor.join(60)
    assert "error" not in seen, seen.get("error")
    assert seen.get("resumed") is True, "training was never released: no prediction completed during the round"
    assert seen["steps"] == 3, "the prediction did not run inside the round"
    assert metrics["steps"] == 10 and trainer.steps == 10  # and the round then ran to its end
    assert np.isfinite(seen["probs"]).all() and abs(float(seen["probs"].sum()) - 1) < 1e-5
    assert seen["label"] == int(seen["probs"].argmax())


def test_the_model_is_locked_while_an_optimisation_step_runs() -> None:
    """Readers and writers of the model started in the middle of an optimiser step (from its pre-hook,
    on the training thread) must wait until that step has finished; without the trainer's lock they
    would read or overwrite half-updated weights."""
    config = toy_config()
    task = ToyTask(config, seed=3)
    trainer = Trainer(config, device="cpu")
    for sample in task.samples(60):
        trainer.add_sample(sample)
    probe = task.sample()
    view = trainer.shared_state()
    finished: dict[str, int] = {}
    during_step: list[str] = []
    operations: dict[str, Callable[[], Any]] = {
        "predict": lambda: trainer.predict(probe),
        "evaluate": lambda: trainer.evaluate(task.samples(4)),
        "apply_global": lambda: trainer.apply_global(view),
        "shared_state": trainer.shared_state,
        "state_dict": trainer.state_dict,
    }

    def run(name: str) -> None:
        operations[name]()
        finished[name] = trainer.steps

    threads = [threading.Thread(target=run, args=(name,)) for name in operations]

    def pre_step(*_: Any) -> None:
        if trainer.steps == 2 and not during_step and threads[0].ident is None:
            for thread in threads:
                thread.start()
            deadline = time.monotonic() + 1.0  # they cannot finish while this step holds the model
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))
            during_step.extend(name for name, thread in zip(operations, threads, strict=True)
                               if not thread.is_alive())

    handle = trainer.optimizer.register_step_pre_hook(pre_step)
    try:
        trainer.train_round(steps=6, batch_size=16)
    finally:
        handle.remove()
        for thread in threads:
            if thread.ident is not None:
                thread.join(60)
    assert threads[0].ident is not None, "the hook never ran"
    assert during_step == [], f"{during_step} ran while an optimisation step was changing the weights"
    assert set(finished) == set(operations) and all(steps >= 3 for steps in finished.values()), finished


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


def _fill(trainer: Trainer, task: ToyTask, n: int) -> list[dict[str, Any]]:
    samples = task.samples(n)
    for sample in samples:
        trainer.add_sample(sample, device_id="dev-1")
    return samples


def test_a_round_trains_on_exactly_the_training_split_and_reports_what_it_saw() -> None:
    """Which samples each step used (seen by the buffer's samples as the round collates them) and the
    logits the model produced for them (seen by a forward hook) give, by hand, the round's metrics."""
    config = toy_config()
    task = ToyTask(config, seed=5)
    used: list[tuple[int, int, int]] = []  # (steps done so far, sample seq, label) as batches are built
    logits: list[torch.Tensor] = []
    trainer: Trainer

    def gate(sample: BufferedSample) -> None:
        if trainer.rounds == 0:
            used.append((trainer.steps, sample.seq, sample.label))

    trainer = Trainer(config, buffer=_GatedBuffer(gate), holdout_every=4, holdout_window=3, device="cpu")
    samples = _fill(trainer, task, 22)  # seqs 0..21; every 4th (0, 4, ..., 20) is held out
    hook = trainer.model.register_forward_hook(
        lambda module, args, out: logits.append(out.logits.detach().clone()) if module.training else None)
    try:
        metrics = trainer.train_round(epochs=2, batch_size=5)
    finally:
        hook.remove()
    train_seqs = {s for s in range(22) if s % 4}
    batches = [[(seq, label) for step, seq, label in used if step == k] for k in range(metrics["steps"])]
    assert [len(b) for b in batches] == [5, 5, 5, 1] * 2  # 16 training samples, batches of 5, two epochs
    for epoch in (batches[:4], batches[4:]):
        seqs = [seq for batch in epoch for seq, _ in batch]
        assert sorted(seqs) == sorted(train_seqs), "an epoch did not use every training sample exactly once"
    assert len(used) == 32 and metrics["n_train"] == 16 and metrics["n_heldout"] == 3
    assert metrics["round"] == 1 and trainer.rounds == 1 and trainer.steps == 8 and metrics["skipped_steps"] == 0
    # the running metrics, recomputed from the logits of each step
    assert len(logits) == 8
    labels = [torch.tensor([label for _, label in batch]) for batch in batches]
    ce = [float(F.cross_entropy(lg, lb)) for lg, lb in zip(logits, labels, strict=True)]
    right = sum(int((lg.argmax(-1) == lb).sum()) for lg, lb in zip(logits, labels, strict=True))
    assert metrics["ce_loss"] == pytest.approx(sum(ce) / 8, rel=1e-5)
    assert metrics["loss"] == pytest.approx(metrics["ce_loss"], rel=1e-6) and metrics["contrastive_loss"] == 0
    assert metrics["train_acc"] == pytest.approx(right / 32)
    # held-out accuracy is measured after the round on the 3 most recent held-out samples (12, 16, 20)
    held = [samples[i] for i in (12, 16, 20)]
    with torch.no_grad():
        trainer.model.eval()
        out = trainer.model(**collate(held, config).model_inputs()).logits
    want = sum(int(out[i].argmax()) == held[i]["label"] for i in range(3)) / 3
    assert metrics["heldout_acc"] == pytest.approx(want) and metrics["duration_s"] > 0


def test_steps_mode_uses_full_batches_and_reshuffles_only_after_a_pass() -> None:
    config = toy_config()
    task = ToyTask(config, seed=6)
    used: list[tuple[int, int]] = []
    trainer: Trainer

    def gate(sample: BufferedSample) -> None:
        if trainer.rounds == 0:
            used.append((trainer.steps, sample.seq))

    trainer = Trainer(config, buffer=_GatedBuffer(gate), holdout_every=5, device="cpu")
    _fill(trainer, task, 19)  # seqs 0..18: 15 training samples (0, 5, 10, 15 held out)
    metrics = trainer.train_round(steps=7, batch_size=5)
    batches = [[seq for step, seq in used if step == k] for k in range(7)]
    assert metrics["steps"] == 7 and [len(b) for b in batches] == [5] * 7
    for start in (0, 3):  # a pass is exactly 3 full batches: every training sample once
        seqs = [seq for b in batches[start:start + 3] for seq in b]
        assert sorted(seqs) == [s for s in range(19) if s % 5]
    with pytest.raises(ValueError, match=r"^give steps or epochs, not both$"):
        trainer.train_round(steps=1, epochs=1)


def test_by_default_a_round_is_one_epoch_in_batches_of_32() -> None:
    config = toy_config()
    trainer = Trainer(config, device="cpu")
    with pytest.raises(InsufficientDataError, match=r"^no trainable samples in the replay buffer$"):
        trainer.train_round()
    _fill(trainer, ToyTask(config, seed=7), 42)  # seqs 0..41: 33 training samples
    metrics = trainer.train_round()
    assert metrics["n_train"] == 33 and metrics["steps"] == 2  # 32 + 1


def test_two_trainers_with_the_same_seed_and_data_train_identically() -> None:
    """Federated averaging assumes a common start; reproducible rounds make runs comparable."""
    config = toy_config()
    data = ToyTask(config, seed=8).samples(30)
    states = []
    for _ in range(2):
        trainer = Trainer(config, device="cpu")
        for sample in data:
            trainer.add_sample(sample)
        trainer.train_round(steps=4, batch_size=8)
        states.append(trainer.shared_state())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_non_finite_losses_are_skipped_without_touching_the_weights() -> None:
    config = toy_config()
    trainer = Trainer(config, device="cpu")
    _fill(trainer, ToyTask(config, seed=9), 20)
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if ".head." in name:
                param.fill_(float("nan"))
    before = trainer.shared_state()
    metrics = trainer.train_round(steps=3, batch_size=8)
    assert metrics["skipped_steps"] == 3 and metrics["steps"] == 0 and trainer.steps == 0
    assert all(np.isnan(metrics[k]) for k in ("loss", "ce_loss", "contrastive_loss", "train_acc"))
    after = trainer.shared_state()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not trainer.optimizer.state, "an optimiser step ran on a non-finite loss"


def test_evaluate_and_predict_match_a_forward_pass_done_by_hand() -> None:
    config = toy_config()
    task = ToyTask(config, seed=10)
    trainer = Trainer(config, device="cpu")
    _fill(trainer, task, 30)
    trainer.train_round(steps=6, batch_size=8)
    probe = task.samples(7)
    with torch.no_grad():
        trainer.model.eval()
        logits = trainer.model(**collate(probe, config).model_inputs()).logits
    labels = torch.tensor([s["label"] for s in probe])
    result = trainer.evaluate(probe, batch_size=3)  # batches of 3, 3, 1
    assert result["n"] == 7
    assert result["acc"] == pytest.approx(float((logits.argmax(-1) == labels).float().mean()))
    assert result["loss"] == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-5)
    empty = trainer.evaluate([])
    assert empty["n"] == 0 and np.isnan(empty["acc"]) and np.isnan(empty["loss"])
    trainer.model.train()
    label, probs = trainer.predict(probe[3])  # a labelled sample: the label is ignored
    want = torch.softmax(logits[3], dim=-1).numpy()
    assert np.allclose(probs, want, atol=1e-6) and label == int(want.argmax()) and probs.dtype == np.float32
    assert trainer.model.training is False


def test_split_holds_out_every_nth_sample_and_keeps_only_the_recent_window() -> None:
    config = toy_config()
    trainer = Trainer(config, holdout_every=3, holdout_window=2, device="cpu")
    _fill(trainer, ToyTask(config, seed=11), 10)
    train, held = trainer.split()
    assert [s.seq for s in train] == [1, 2, 4, 5, 7, 8]
    assert [s.seq for s in held] == [6, 9]  # held-out are 0, 3, 6, 9: the two most recent
    added = trainer.add_sample({"modalities": {"env": np.ones(8)}, "label": 2})
    assert added.device_id == "local" and added.label == 2 and added.seq == 10
    with pytest.raises(ValueError):
        Trainer(config, holdout_every=1)
    assert Trainer(config, holdout_every=2, lr=0.05, weight_decay=0.2).optimizer.param_groups[0]["lr"] == 0.05


def test_applying_a_global_can_keep_the_optimiser_moments_when_asked() -> None:
    config = toy_config()
    trainer = Trainer(config, reset_shared_optimizer_state=False, device="cpu")
    _fill(trainer, ToyTask(config, seed=12), 20)
    trainer.train_round(steps=2, batch_size=8)
    moments = len(trainer.optimizer.state)
    trainer.apply_global({k: v + 0.1 for k, v in trainer.shared_state().items()})
    assert len(trainer.optimizer.state) == moments


def test_a_checkpoint_that_does_not_fit_is_refused_and_rolled_back() -> None:
    config = toy_config()
    task = ToyTask(config, seed=13)
    trainer = Trainer(config, device="cpu")
    _fill(trainer, task, 20)
    trainer.train_round(steps=3, batch_size=8)
    good = trainer.state_dict()
    other = Trainer(config, device="cpu")
    _fill(other, task, 20)
    other.train_round(steps=2, batch_size=8)
    probe = task.sample()
    before, before_opt = other.predict(probe)[1], other.optimizer.state_dict()
    name = next(iter(good["personal"]))
    broken_personal = {**good, "personal": {**good["personal"], name: torch.zeros(1)}}
    broken_optimizer = {**good, "optimizer": {"state": {}, "param_groups": []}}
    for broken in (broken_personal, broken_optimizer):
        with pytest.raises(CheckpointError, match=r"^checkpoint does not fit this model"):
            other.load_state_dict(broken)
        assert np.array_equal(other.predict(probe)[1], before), "a refused checkpoint changed the model"
        assert other.steps == 2 and other.rounds == 1
        assert other.optimizer.state_dict()["state"].keys() == before_opt["state"].keys()
    renamed = {**good, "meta": {**good["meta"], "param_names": good["meta"]["param_names"][:-1]}}
    with pytest.raises(CheckpointError, match=r"^checkpoint trainable parameters differ from this model's$"):
        other.load_state_dict(renamed)
    foreign = {**good, "meta": {**good["meta"], "base_fingerprint": "0" * 64}}
    with pytest.raises(CheckpointError, match=r"^checkpoint was made for a different frozen base$"):
        other.load_state_dict(foreign)
    missing = {**good, "shared": dict(list(good["shared"].items())[1:])}  # a checkpoint is always complete
    with pytest.raises(CheckpointError, match=r"^checkpoint does not fit this model: missing shared tensor"):
        other.load_state_dict(missing)
    assert np.array_equal(other.predict(probe)[1], before)
    other.load_state_dict(good)
    assert other.steps == 3 and other.rounds == 1
    legacy = {**good, "meta": {k: v for k, v in good["meta"].items() if k not in ("rounds", "steps")}}
    other.load_state_dict(legacy)  # written before rounds and steps were counted
    assert other.steps == 0 and other.rounds == 0
    assert np.allclose(other.predict(probe)[1], trainer.predict(probe)[1], atol=1e-6)


def test_personal_state_is_the_edge_only_part_and_stays_home() -> None:
    config = toy_config()
    trainer = Trainer(config, device="cpu")
    personal, shared = trainer.personal_state(), trainer.shared_state()
    assert personal and {k.split(".")[0] for k in personal} == {
        "head", "cross_modal", "cls_token", "modality_embed", "position_embed"}
    assert not set(personal) & {k.removeprefix("base_model.model.") for k in shared}


def test_a_checkpoint_with_malformed_metadata_is_refused(tmp_path) -> None:
    config = toy_config()
    trainer = Trainer(config, device="cpu")
    path = trainer.save_checkpoint(tmp_path / "ckpt")
    meta_file = path / "checkpoint.json"
    body = json.loads(meta_file.read_text())
    del body["meta"]["optimizer"]
    meta_file.write_text(json.dumps(body))
    assert body["meta"]["config"] == config.to_dict()  # the checkpoint says which model it was made for
    with pytest.raises(CheckpointError, match=r"^malformed checkpoint metadata: 'optimizer'$"):
        Trainer(config, device="cpu").load_checkpoint(path)
    assert trainer.shared_state(torch.float16)[next(iter(trainer.shared_state()))].dtype == torch.float16
