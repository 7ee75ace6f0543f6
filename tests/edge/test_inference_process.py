"""The serving copy in a child process answers exactly like the trainer's model, follows syncs, survives a kill.

Expectations come from the trainer's own model, evaluated here with plain torch (not through either predictor).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from broker.address import BrokerAddress
from edge_agent.checkpoints import build_trainer
from edge_agent.inference_process import PredictorDown, ProcessPredictor
from edge_agent.training.toy_task import ToyTask
from megace_model.adapters import personal_state, shared_state
from megace_model.batch import collate
from megace_model.errors import AdapterMismatchError
from tests.support.edge_testkit import edge_config

torch.set_num_threads(1)
NOWHERE = BrokerAddress("127.0.0.1", 1)


def reference(trainer, samples) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Probabilities of the trainer's model itself, in eval mode."""
    model = trainer.model
    model.eval()
    with torch.no_grad():
        batch = collate(samples, trainer.config, with_labels=False)
        return torch.softmax(model(**batch.model_inputs()).logits.float(), dim=-1).numpy()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    config = edge_config(tmp_path_factory.mktemp("infer") / "state", NOWHERE)
    trainer = build_trainer(config)
    task = ToyTask(config.model, seed=4)
    for s in task.samples(64):
        trainer.buffer.add("d", s["modalities"], int(s["label"]))
    trainer.train_round(steps=5, batch_size=16)  # the adapters are no longer version 0's
    predictor = ProcessPredictor(config.model, trainer.device, shared=shared_state(trainer.model),
                                 personal=personal_state(trainer.model), version=3)
    yield config, trainer, task.samples(8), predictor
    predictor.close()


def test_the_child_answers_like_the_trainers_model(setup) -> None:  # type: ignore[no-untyped-def]
    _, trainer, samples, predictor = setup
    assert predictor.pid is not None and predictor.pid != os.getpid() and predictor.version == 3
    got = predictor.predict(samples)
    want = reference(trainer, samples)
    np.testing.assert_allclose(np.stack([p for _, p in got]), want, atol=1e-6)
    assert [label for label, _ in got] == [int(np.argmax(w)) for w in want]


def test_a_sync_installs_new_tensors_and_a_bad_one_changes_nothing(setup) -> None:  # type: ignore[no-untyped-def]
    _, trainer, samples, predictor = setup
    before = np.stack([p for _, p in predictor.predict(samples)])
    trainer.train_round(steps=10, batch_size=16)
    want = reference(trainer, samples)
    assert np.abs(want - before).max() > 1e-4  # training moved the model, so the check below means something
    predictor.sync(shared_state(trainer.model), personal_state(trainer.model), 4)
    np.testing.assert_allclose(np.stack([p for _, p in predictor.predict(samples)]), want, atol=1e-6)
    bad = {k: torch.zeros(3) for k in shared_state(trainer.model)}
    with pytest.raises(AdapterMismatchError):
        predictor.sync(bad, personal_state(trainer.model), 5)
    assert predictor.version == 4
    np.testing.assert_allclose(np.stack([p for _, p in predictor.predict(samples)]), want, atol=1e-6)


def test_a_killed_child_is_started_again_with_the_last_tensors(setup) -> None:  # type: ignore[no-untyped-def]
    _, trainer, samples, predictor = setup
    predictor.sync(shared_state(trainer.model), personal_state(trainer.model), 6)
    old = predictor.pid
    assert old is not None
    os.kill(old, signal.SIGKILL)
    got = predictor.predict(samples)  # the call that finds it dead restarts it and is answered
    assert predictor.pid not in (None, old) and predictor.restarts == 1
    np.testing.assert_allclose(np.stack([p for _, p in got]), reference(trainer, samples), atol=1e-6)


def test_a_child_that_cannot_start_is_a_typed_error(tmp_path: Path) -> None:
    config = edge_config(tmp_path / "state", NOWHERE)
    trainer = build_trainer(config)
    predictor = ProcessPredictor(config.model, trainer.device)
    try:
        predictor.device = torch.device("cuda:7")  # what the next child is built for: no such device here
        os.kill(predictor.pid, signal.SIGKILL)  # type: ignore[arg-type]
        with pytest.raises(PredictorDown, match="did not start"):
            predictor.predict(ToyTask(config.model, seed=1).samples(1))
        assert predictor.pid is None
    finally:
        predictor.close()


async def test_an_agent_serving_from_a_process_answers_devices(mosquitto_addr, tmp_path: Path) -> None:
    from broker.wire import Kind
    from tests.support.edge_testkit import Device, eventually, record, running, uid

    config = edge_config(tmp_path / "state", mosquitto_addr, {"training": {"inference_process": True}})
    samples = ToyTask(config.model, seed=9).samples(5)
    async with running(config) as agent:
        assert isinstance(agent.predictor, ProcessPredictor) and agent.predictor.pid != os.getpid()
        dev = await Device(config.site, uid("dev"), mosquitto_addr, tmp_path).start()
        try:
            for i, s in enumerate(samples):
                await dev.infer(record(dev.id, i, s, label=False))
            await eventually(lambda: len(dev.received(Kind.PREDICTION)) == 5, 30, "predictions")
            got = {int(p.sample): np.asarray(p.probs) for p in dev.received(Kind.PREDICTION)}
            want = reference(agent.trainer, samples)
            np.testing.assert_allclose(np.stack([got[i] for i in range(5)]), want, atol=1e-5)
        finally:
            await dev.close()
        child = agent.predictor.pid
    assert child is not None and not _alive(child)  # shutdown stopped it


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
