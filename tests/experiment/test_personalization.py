"""The personalization variants of the fleet benchmark (megace.experiment.personalization) on the real model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from edge_agent.training.toy_task import ToyTask, toy_config
from megace.experiment.personalization import FleetTrainer, Personalization
from megace_model.errors import AdapterMismatchError, NonFiniteAdapterError

HEAD = ("head",)


def _trainer(p: Personalization, **kw: object) -> FleetTrainer:
    torch.manual_seed(0)
    return FleetTrainer(toy_config(seed=1), device="cpu", lr=1e-2, personalization=p, **kw)


def _fill(t: FleetTrainer, task: ToyTask, n: int) -> None:
    for s in task.samples(n):
        t.add_sample(s)


def _head(t: FleetTrainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in t.fleet_state().items()}


BODY = ("cross_modal", "modality_embed", "position_embed", "cls_token")


def _newcomer_accuracy(p: Personalization) -> tuple[float, float, float, float]:
    """(fleet's accuracy, newcomer before the blend, after it, a newcomer without the fleet's head)."""
    task = ToyTask(toy_config(seed=1), seed=5, noise=0.6)
    test = task.samples(200)
    fleet = _trainer(p)
    _fill(fleet, task, 200)
    for _ in range(2):
        fleet.train_round(steps=10)
    # a site that has only seen class 0: on its own its head answers 0 for everything
    newcomer, plain = _trainer(p), _trainer(Personalization(frozen=p.frozen))
    for t in (newcomer, plain):
        for s in task.samples(12, label=0):
            t.add_sample(s)
        t.apply_global(fleet.shared_state())
        t.train_round(steps=5)
        with torch.no_grad():  # a head of its own, unlike the fleet's (every edge starts from the same seeded one)
            g = torch.Generator().manual_seed(9)
            for name, param in t.model.named_parameters():
                if ".head." in name:
                    param.copy_(torch.randn(param.shape, generator=g))
        t.apply_global(fleet.shared_state())  # the next global arrives (here: the same adapter)
    newcomer.apply_fleet(fleet.fleet_state())
    before = newcomer.evaluate(test)["acc"]  # the served head is the site's own until the next round starts
    newcomer.train_round(steps=0)  # a round starts: the fleet's head is blended in (mix 1: taken as is)
    plain.train_round(steps=0)
    return fleet.evaluate(test)["acc"], before, newcomer.evaluate(test)["acc"], plain.evaluate(test)["acc"]


def test_head_from_the_fleet_starts_at_the_fleets_accuracy_when_the_body_is_shared() -> None:
    fleet_acc, before, after, alone = _newcomer_accuracy(Personalization(fleet_modules=HEAD, frozen=BODY))
    assert fleet_acc > 0.8 and before < 0.5
    assert after == pytest.approx(fleet_acc, abs=1e-9)  # same frozen body, same LoRA, same head: same model
    assert after - alone >= 0.3


def test_a_fleet_head_on_a_private_body_does_not_carry_the_fleets_accuracy() -> None:
    """Why head sharing alone did not pay in the fleet benchmark: the head sits on features only its edge has."""
    fleet_acc, _, after, _ = _newcomer_accuracy(Personalization(fleet_modules=HEAD))
    assert fleet_acc > 0.8
    assert after < fleet_acc - 0.2


def test_mix_blends_exactly_and_resets_adam_moments() -> None:
    task = ToyTask(toy_config(seed=1), seed=2)
    a, b = _trainer(Personalization(fleet_modules=HEAD, mix=0.25)), _trainer(Personalization(fleet_modules=HEAD))
    for t in (a, b):
        _fill(t, task, 60)
    b.train_round(steps=5)
    a.train_round(steps=3)
    own, fleet = _head(a), _head(b)
    a.apply_fleet(fleet)
    a.train_round(steps=0)
    for name, value in _head(a).items():
        torch.testing.assert_close(value, 0.75 * own[name] + 0.25 * fleet[name])
    head_params = [p for n, p in a.model.named_parameters() if ".head." in n]
    assert head_params and all(p not in a.optimizer.state for p in head_params)


def test_ditto_pulls_the_own_head_towards_the_fleets() -> None:
    task = ToyTask(toy_config(seed=1), seed=3)
    # the fleet's head: the seeded initial head shifted by 0.1 everywhere, within reach of 20 AdamW steps of 0.01
    anchor = {k: v + 0.1 for k, v in _trainer(Personalization(fleet_modules=HEAD)).fleet_state().items()}

    def distance(prox: float) -> float:
        t = _trainer(Personalization(fleet_modules=HEAD, mix=0.0, prox=prox))
        _fill(t, task, 80)
        t.apply_fleet(anchor)
        t.train_round(steps=20)
        return math.sqrt(sum(float((v - anchor[k]).pow(2).sum()) for k, v in t.fleet_state().items()))

    assert distance(100.0) < 0.6 * distance(0.0)


def test_bad_fleet_tensors_raise_and_change_nothing() -> None:
    t = _trainer(Personalization(fleet_modules=HEAD))
    _fill(t, ToyTask(toy_config(seed=1), seed=4), 30)
    before = _head(t)
    bad_nan = {k: torch.full_like(v, math.nan) for k, v in before.items()}
    with pytest.raises(NonFiniteAdapterError):
        t.apply_fleet(bad_nan)
    with pytest.raises(AdapterMismatchError):
        t.apply_fleet({**before, "head.9.weight": torch.zeros(2)})
    with pytest.raises(AdapterMismatchError):
        t.apply_fleet({k: torch.zeros(3) for k in before})
    t.train_round(steps=0)
    for name, value in _head(t).items():
        torch.testing.assert_close(value, before[name])


def test_default_uploads_no_personal_tensor_and_settings_are_checked() -> None:
    assert _trainer(Personalization()).fleet_state() == {}
    with pytest.raises(ValueError):
        Personalization(fleet_modules=("backbone",))
    with pytest.raises(ValueError):
        Personalization(fleet_modules=HEAD, mix=1.5)
    with pytest.raises(ValueError):
        Personalization(fleet_modules=HEAD, frozen=HEAD)


def test_frozen_modules_keep_the_shared_init() -> None:
    p = Personalization(frozen=("cross_modal",))
    a, b = _trainer(p), _trainer(p)
    _fill(a, ToyTask(toy_config(seed=1), seed=6), 50)
    _fill(b, ToyTask(toy_config(seed=1), seed=7), 50)
    a.train_round(steps=5)
    b.train_round(steps=5)
    pa, pb = a.personal_state(), b.personal_state()
    cross = [k for k in pa if k.startswith("cross_modal.")]
    assert cross and all(torch.equal(pa[k], pb[k]) for k in cross)
    assert not torch.equal(pa["head.1.weight"], pb["head.1.weight"])
    assert not np.isclose(a.train_round(steps=1)["loss"], 0.0)
