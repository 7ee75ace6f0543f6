"""Adaptive local aggregation (``Personalization.mix_grid``): a round starts from the best fleet/own mix."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_agent.training.adaptive_mix import mix
from megace.datasets.fleet import FleetSpec, build_fleet
from megace.experiment.fleet_arms import ARM_BY_NAME, SETTINGS, FleetPlan
from megace.experiment.fleet_sim import SimEdge


def test_mix_weights_the_fleet_against_the_own_model() -> None:
    own = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[4.0]])}
    fleet = {"a": torch.tensor([5.0, -2.0]), "b": torch.tensor([[0.0]])}
    out = mix(fleet, own, 0.25)
    assert torch.equal(out["a"], torch.tensor([2.0, 1.0]))  # 0.25 * 5 + 0.75 * 1, 0.25 * -2 + 0.75 * 2
    assert torch.equal(out["b"], torch.tensor([[3.0]]))
    assert torch.equal(mix(fleet, own, 1.0)["a"], fleet["a"])
    assert torch.equal(mix(fleet, own, 0.0)["a"], own["a"])


def _trainable(e: SimEdge) -> dict[str, np.ndarray]:
    return {n: p.detach().numpy().copy() for n, p in e.trainer.model.named_parameters() if p.requires_grad}


def _edges(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arm: str) -> tuple[SimEdge, SimEdge]:
    monkeypatch.setenv("MEGACE_CACHE", str(tmp_path / "cache"))
    plan = replace(FleetPlan((SETTINGS["alpha0.5"],), (arm,), (0,), edges=3, devices_per_edge=2),
                   steps=4, train_per_edge=60, n_voices=5)
    fleet = build_fleet(FleetSpec(edges=3, devices_per_edge=2, alpha=0.5, train_per_edge=60, n_voices=5, seed=0))
    out = []
    for i in (0, 1):
        torch.manual_seed(i)
        e = SimEdge(f"edge-{i}", fleet.edges[i], fleet.global_test, ARM_BY_NAME[arm], 8, 0, plan)
        e.train()
        out.append(e)
    return out[0], out[1]


def _held_accuracy(e: SimEdge, state: dict[str, np.ndarray]) -> float:
    """Held-out accuracy of ``state`` computed by hand: load it, count argmax hits."""
    params = dict(e.trainer.model.named_parameters())
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(torch.from_numpy(v))
    held = e.trainer.split()[1]
    hits = sum(int(e.trainer.predict(s.as_sample())[0] == s.label) for s in held)
    return hits / len(held)


def test_a_round_starts_from_the_mix_that_does_best_on_held_out(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The chosen weight is the best of the grid on held-out (ties: the larger), and the model is that mix."""
    site, other = _edges(tmp_path, monkeypatch, "fedit-ala")
    contribution, _ = other.upload(1)
    # the fleet's model: another site's, pushed far off so that it must not win outright
    view = {k: (v * 3.0 if v.ndim == 2 else v).astype(np.float32) for k, v in contribution.tensors.items()}
    own = _trainable(site)
    site.install(view)
    assert all(np.array_equal(v, own[k]) for k, v in _trainable(site).items())  # deferred: still the site's
    names = dict(site.trainer.model.named_parameters())
    # the view names LoRA tensors without peft's adapter name, personal ones with peft's prefix (as trained)
    fleet_state = {k: view[k.replace(".default", "")] for k in own}
    grid = site.arm.personalization.mix_grid
    scores = {w: _held_accuracy(site, {k: w * fleet_state[k] + (1 - w) * own[k] for k in own}) for w in grid}
    best = max(grid, key=lambda w: (scores[w], w))
    assert best < 1.0, scores  # the far-off fleet model loses to some of the site's own
    # back to the site's state (the install above is deferred, the hand evaluation overwrote parameters)
    with torch.no_grad():
        for k, v in own.items():
            names[k].copy_(torch.from_numpy(v))
    site.plan = replace(site.plan, steps=0)
    site.train()
    assert site.mix_weights == [best]
    now = _trainable(site)
    for k in own:
        np.testing.assert_allclose(now[k], best * fleet_state[k] + (1 - best) * own[k], rtol=1e-5, atol=1e-6)


def test_a_tie_keeps_the_fleets_larger_weight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fleet's model equal to the site's: every mix scores the same, and the largest weight is kept."""
    site, _ = _edges(tmp_path, monkeypatch, "fedit-ala")
    contribution, _ = site.upload(1)
    site.install(contribution.tensors)
    site.plan = replace(site.plan, steps=0)
    site.train()
    assert site.mix_weights == [max(site.arm.personalization.mix_grid)]


def test_the_compressed_update_is_measured_from_the_fleets_model(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """``megace-ala``: a round may start from a mix the cloud never saw, so the low-rank update that travels is
    the trained model minus the fleet's model (which the cloud has): each body matrix sent differs from the
    fleet's by a matrix of rank at most the uplink's."""
    site, other = _edges(tmp_path, monkeypatch, "megace-ala")
    contribution, _ = other.upload(1)
    fleet = {k: v.astype(np.float32) for k, v in contribution.tensors.items()}
    site.install(fleet)
    site.train()  # starts from a mix, then trains 4 steps
    weights = site.mix_weights
    assert weights and weights[0] < 1.0  # else the test could not tell the references apart
    sent, _ = site.upload(2)
    rank = site.arm.body_uplink.rank
    checked = 0
    for k, v in sent.tensors.items():
        if k in fleet and v.ndim == 2 and rank * sum(v.shape) < v.size and ".lora_" not in k:
            delta = v.astype(np.float64) - fleet[k]
            s = np.linalg.svd(delta, compute_uv=False)
            assert s[rank] <= 1e-3 * max(s[0], 1e-12), k  # rank <= uplink rank (float16 factors: a small floor)
            checked += 1
    assert checked > 0
