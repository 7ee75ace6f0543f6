"""``megace experiment --fleet``: its options, a tiny real run end to end, and the paired significance tests."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from megace.cli import app
from megace.datasets.fleet import Fleet, FleetSpec, build_fleet
from megace.experiment.fleet_arms import (
    ARM_BY_NAME,
    FULL_ARMS,
    MAIN_ARMS,
    QUICK_ARMS,
    SETTINGS,
    FleetPlan,
    plan_from_options,
)
from megace.experiment.fleet_runner import run_fleet_experiment
from megace.experiment.fleet_sim import SimEdge
from megace.experiment.significance import paired, wilcoxon_exact
from megace_common.lora import add_peft_prefix


def test_options_make_the_plan() -> None:
    plan = plan_from_options(quick=False, seeds=6, arms=None, alpha="0.1,inf", edges=12, devices_per_edge=4)
    assert [s.alpha for s in plan.settings] == [0.1, math.inf]
    assert plan.settings[1].feature_skew > plan.settings[0].feature_skew  # inf: the feature-skew setting
    assert (plan.edges, plan.devices_per_edge, plan.seeds, plan.arms) == (12, 4, tuple(range(6)), MAIN_ARMS)
    quick = plan_from_options(quick=True, seeds=None, arms="local-only,megace", alpha=None, edges=None,
                              devices_per_edge=None)
    assert quick.reduced and quick.seeds == (0,) and quick.arms == ("local-only", "megace")
    assert [s.alpha for s in quick.settings] == [0.1] and quick.name == "experiment-fleet-quick"
    assert set(QUICK_ARMS) <= set(FULL_ARMS)
    default = plan_from_options(quick=False, seeds=None, arms=None, alpha=None, edges=None, devices_per_edge=None)
    assert len(default.seeds) == 5 and {s.alpha for s in default.settings} == {0.1, 0.5, math.inf}


@pytest.mark.parametrize("args", [["--alpha", "0"], ["--alpha", "x"], ["--fleet", "--arms", "nope"]])
def test_bad_options_are_refused_before_anything_runs(args: list[str], tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["experiment", *args, "--out", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert not any(tmp_path.iterdir())


def test_a_tiny_fleet_runs_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEGACE_CACHE", str(tmp_path / "cache"))
    plan = plan_from_options(quick=True, seeds=2, arms="local-only,megace", alpha="0.5", edges=3,
                             devices_per_edge=2)
    plan = replace(plan, rounds=2, steps=1, late_join=2, train_per_edge=30, n_voices=5)  # 4 train voices: 4 sites
    report = run_fleet_experiment(plan, tmp_path / "out", console=Console(quiet=True), work=tmp_path / "runs")
    data = json.loads((tmp_path / "out" / "experiment-fleet-quick.json").read_text())
    assert report.exists() and (tmp_path / "out" / "experiment-fleet-quick-tradeoff.png").stat().st_size > 0
    assert data["plan"]["edges"] == 3 and data["plan"]["devices_per_edge"] == 2
    runs = data["runs"]
    assert {(r["arm"], r["seed"]) for r in runs} == {(a, s) for a in ("local-only", "megace") for s in (0, 1)}
    for r in runs:
        assert sorted(r["personal"]) == ["edge-0", "edge-1", "edge-2"]
        assert len(r["curve"]) == 2 and len(r["late_curve"]) == 1
        assert all(0.0 <= v <= 1.0 for v in r["personal"].values())
        if r["arm"] == "local-only":
            assert r["upload_bytes"] == 0
        else:
            assert r["upload_bytes"] > 0
    # a second invocation reuses every saved run instead of training again
    again = run_fleet_experiment(plan, tmp_path / "out2", console=Console(quiet=True), work=tmp_path / "runs")
    assert json.loads(again.with_suffix(".json").read_text())["runs"] == runs


def test_wilcoxon_exact_known_values() -> None:
    # all five differences positive: only 1 of 32 sign patterns is as extreme on each side -> 2/32
    assert wilcoxon_exact([1, 2, 3, 4, 5]) == pytest.approx(2 / 32)
    # W- = 5: 10 of 32 subsets of {1..5} sum to <= 5 -> two-sided 20/32
    assert wilcoxon_exact([1, 2, 3, 4, -5]) == pytest.approx(20 / 32)
    # ties share ranks (1.5, 1.5, 3) and zeros are dropped: W+ = 6 of 6, two-sided 2/8
    assert wilcoxon_exact([0.2, 0.2, 0.5, 0.0]) == pytest.approx(2 / 8)
    assert wilcoxon_exact([0.0, 0.0]) == 1.0


def test_paired_t_known_values() -> None:
    # differences 1..5: mean 3, sd sqrt(2.5), t = 3 / (sqrt(2.5)/sqrt(5)) = 4.2426, df 4 -> p = 0.01324 (tables)
    t = paired([2, 4, 6, 8, 10], [1, 2, 3, 4, 5])
    assert t.n == 5 and t.mean_diff == pytest.approx(3.0)
    assert t.t == pytest.approx(4.242641, rel=1e-5)
    assert t.p_t == pytest.approx(0.013236, abs=2e-5)
    assert t.p_wilcoxon == pytest.approx(2 / 32)
    # a non-finite pair is dropped, not counted
    assert paired([1.0, float("nan"), 3.0], [0.0, 1.0, 1.0]).n == 2


def test_plan_name_and_cache_key_depend_on_knobs() -> None:
    from megace.experiment.fleet_runner import plan_key

    a = FleetPlan.full()
    assert plan_key(a) == plan_key(replace(a, seeds=(0,)))  # the lists are not part of the key
    assert plan_key(a) != plan_key(replace(a, rounds=a.rounds + 1))


def test_horizon_options_name_the_report_and_change_the_cache_key() -> None:
    from megace.experiment.fleet_runner import plan_key

    plan = plan_from_options(quick=False, seeds=3, arms="fedit,fedit-ft", alpha="0.5", edges=None,
                             devices_per_edge=None, rounds=15, steps=12, label="horizon")
    assert (plan.rounds, plan.steps, plan.name) == (15, 12, "experiment-fleet-horizon")
    assert plan_key(plan) != plan_key(replace(plan, rounds=5)) != plan_key(replace(plan, steps=10))
    default = plan_from_options(quick=False, seeds=3, arms=None, alpha="0.5", edges=None, devices_per_edge=None)
    assert (default.rounds, default.steps, default.name) == (5, 10, "experiment-fleet")


@pytest.mark.parametrize("args", [["--fleet", "--rounds", "2"], ["--fleet", "--label", "Bad Name"],
                                  ["--fleet", "--steps", "0"]])
def test_bad_horizon_options_are_refused(args: list[str], tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["experiment", *args, "--out", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert not any(tmp_path.iterdir())


def _tiny_fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arm: str, steps: int) -> tuple[FleetPlan, Fleet]:
    """Three edges of two devices, 30 samples each, five voices: seconds to build."""
    monkeypatch.setenv("MEGACE_CACHE", str(tmp_path / "cache"))
    plan = replace(FleetPlan((SETTINGS["alpha0.5"],), (arm,), (0,), edges=3, devices_per_edge=2),
                   steps=steps, train_per_edge=30, n_voices=5)
    return plan, build_fleet(FleetSpec(edges=3, devices_per_edge=2, alpha=0.5, train_per_edge=30, n_voices=5,
                                       seed=0))


def test_fedavg_ft_serves_the_site_tuned_model_until_the_next_round(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """``fedit-ft``: the fleet's model (LoRA and everything personal) replaces the site's only when a round starts."""
    plan, fleet = _tiny_fleet(tmp_path, monkeypatch, "fedit-ft", steps=2)

    def state(e: SimEdge) -> dict[str, np.ndarray]:
        return {n: p.detach().numpy().copy() for n, p in e.trainer.model.named_parameters() if p.requires_grad}

    def edge(i: int, arm: str) -> SimEdge:
        torch.manual_seed(i)
        e = SimEdge(f"edge-{i}", fleet.edges[i], fleet.global_test, ARM_BY_NAME[arm], 8, 0, plan)
        e.train()
        return e

    other = edge(1, "fedit-ft")
    view, _ = other.upload(1)
    expected = state(other)
    for arm, deferred in (("fedit-ft", True), ("fedit", False)):
        site = edge(0, arm)
        served = state(site)
        assert any(not np.array_equal(served[k], expected[k]) for k in served)  # two different models
        site.install(view.tensors)
        now = state(site)
        assert now.keys() == expected.keys()
        want = served if deferred else expected
        assert all(np.array_equal(now[k], want[k]) for k in now), arm
        if deferred:
            site.plan = replace(plan, steps=0)
            site.train()  # the round starts from the fleet's model
            now = state(site)
            assert all(np.array_equal(now[k], expected[k]) for k in now)


def test_megace_body_uploads_float16_lora_and_low_rank_body_updates(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The bytes counted are the factors' (computed here from the shapes), and the cloud gets start + update."""
    plan, fleet = _tiny_fleet(tmp_path, monkeypatch, "megace-body", steps=3)
    arm = ARM_BY_NAME["megace-body"]
    e = SimEdge("edge-0", fleet.edges[0], fleet.global_test, arm, 4, 0, plan)
    start = {k: v.clone() for k, v in e.trainer.personal_state().items()}
    e.train()
    trained = e.trainer.personal_state()
    contribution, nbytes = e.upload(1)
    r = arm.body_uplink.rank
    lora = sum(v.numel() for v in e.trainer.shared_state().values())
    body = 0
    for v in start.values():
        small = v.ndim != 2 or r * sum(v.shape) >= v.numel()
        body += v.numel() if small else r * sum(v.shape)
    assert nbytes == 2 * (lora + body)
    assert nbytes < 0.25 * 4 * (lora + sum(v.numel() for v in start.values()))
    moved = 0
    for k, v in start.items():
        sent = torch.from_numpy(contribution.tensors[add_peft_prefix(k)])
        if v.ndim == 2 and r * sum(v.shape) < v.numel():  # an approximation of the update, not the trained value
            err = float((sent - trained[k]).norm())
            assert 0 < err <= float((v - trained[k]).norm()) + 1e-3
            moved += int(not torch.allclose(sent, v))
        else:
            assert torch.allclose(sent, trained[k], atol=2e-3 * (1 + float(trained[k].abs().max())))
    assert moved > 0
