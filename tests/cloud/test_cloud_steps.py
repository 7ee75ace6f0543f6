"""Step clipping: how far one upload may move the global, judged against what its edge was sent.

Expected steps are formed densely in numpy (``s (B A - B_v A_v)``, out x in) from the tensors as sent;
the code under test uses the rxr Gram form and never forms the dense matrix.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from broker import topics
from cloud_aggregator.contribution import Contribution
from cloud_aggregator.core import AggregatorCore
from cloud_aggregator.ledger import Ledger
from cloud_aggregator.steps import StepBound
from tests.cloud.test_cloud_poisoning import (
    ADDR,
    base_weight_norm,
    delta_norm,
    feedback,
    fingerprint,
    global_delta,
    honest,
    norm_of,
    send,
)
from tests.support.cloud_bus import cloud_config, update_payload

MOD = "base_model.model.enc.q"
A, B = f"{MOD}.lora_A.weight", f"{MOD}.lora_B.weight"


def contribution(a: np.ndarray, b: np.ndarray, *, rank: int, alpha: float) -> Contribution:
    return Contribution(edge_id="e", seq=1, base_version=0, rank=rank, alpha=alpha, samples=8,
                        tensors={A: np.array(a, dtype=np.float32), B: np.array(b, dtype=np.float32)})


def dense_step(a: np.ndarray, b: np.ndarray, va: np.ndarray, vb: np.ndarray, s: float) -> float:
    return float(np.linalg.norm(s * (b.astype(np.float64) @ a.astype(np.float64)
                                     - vb.astype(np.float64) @ va.astype(np.float64))))


def test_the_step_is_the_dense_change_from_the_view() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((4, 10)), rng.standard_normal((6, 4))
    va, vb = rng.standard_normal((4, 10)), rng.standard_normal((6, 4))
    view = {A: np.array(va, dtype=np.float32), B: np.array(vb, dtype=np.float32)}
    got = StepBound().steps(contribution(a, b, rank=4, alpha=12.0), view)
    assert got[MOD] == pytest.approx(dense_step(a.astype(np.float32), b.astype(np.float32),
                                                va.astype(np.float32), vb.astype(np.float32), 3.0), rel=1e-6)
    # tiny steps too (a norm below 1 is not rounded up anywhere)
    small = StepBound().steps(contribution(a * 1e-3, b * 1e-3, rank=4, alpha=12.0), view)[MOD]
    assert small == pytest.approx(dense_step((a * 1e-3).astype(np.float32), (b * 1e-3).astype(np.float32),
                                             va.astype(np.float32), vb.astype(np.float32), 3.0), rel=1e-5)
    # a module the view lacks is a step from nothing: the whole update
    assert StepBound().steps(contribution(a, b, rank=4, alpha=4.0), {})[MOD] == pytest.approx(
        float(np.linalg.norm(b.astype(np.float32).astype(np.float64) @ a.astype(np.float32).astype(np.float64))),
        rel=1e-6)


def test_a_typical_step_is_left_exactly_as_sent_and_a_long_one_is_pulled_toward_the_view() -> None:
    rng = np.random.default_rng(2)
    va, vb = rng.standard_normal((4, 10)).astype(np.float32), rng.standard_normal((6, 4)).astype(np.float32)
    view = {A: np.array(va), B: np.array(vb)}
    one = dense_step(va, 1.1 * vb, va, vb, 1.0)  # an honest step: B grew by a tenth
    bound = StepBound(multiplier=2.0, min_history=3)
    bound.rearm([{MOD: one}] * 3)
    assert bound.limits({MOD: 5.0}) == {MOD: pytest.approx(2 * one)}

    typical = contribution(va, 1.1 * vb, rank=4, alpha=4.0)
    got, steps, cut = bound.clip(typical, view)
    assert cut == 0 and got is typical and steps[MOD] == pytest.approx(one, rel=1e-6)

    flipped = contribution(va, -3.0 * vb, rank=4, alpha=4.0)  # the global sent back flipped: step 4 |B_v A_v|
    got, steps, cut = bound.clip(flipped, view)
    sent = dense_step(va, -3.0 * vb, va, vb, 1.0)
    assert cut == 1 and sent > 10 * one
    a2, b2 = got.tensors[A], got.tensors[B]
    assert dense_step(a2, b2, va, vb, 1.0) == pytest.approx(2 * one, rel=1e-5)  # exactly at the bound (A unchanged)
    assert steps[MOD] == pytest.approx(2 * one, rel=1e-5)
    lam = 2 * one / sent
    np.testing.assert_allclose(b2, vb + lam * (-3.0 * vb - vb), rtol=1e-5, atol=1e-6)  # v + λ (x - v)
    np.testing.assert_array_equal(a2, va)


def test_no_history_means_the_cold_bound_and_none_means_unbounded() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((4, 10)).astype(np.float32), rng.standard_normal((6, 4)).astype(np.float32)
    c = contribution(a, 100 * b, rank=4, alpha=4.0)
    assert StepBound(cold_bound=None).clip(c, {})[2] == 0
    got, steps, cut = StepBound(cold_bound=5.0, min_history=2).clip(c, {})
    assert cut == 1 and dense_step(got.tensors[A], got.tensors[B], 0 * a, 0 * b, 1.0) <= 5.0 + 1e-6
    # both factors move toward the (zero) view, so the step shrinks as λ²: halving finds a λ that fits
    assert steps[MOD] <= 5.0 * (1 + 1e-9)
    # modules without history share the cold bound: two steps of 4 (5.66 together) are cut to 5 together
    assert StepBound(cold_bound=5.0).limits({"m1": 4.0, "m2": 4.0}) == {"m1": pytest.approx(5 / 2**0.5),
                                                                       "m2": pytest.approx(5 / 2**0.5)}
    mod2 = "base_model.model.enc.v"
    two = Contribution(edge_id="e", seq=1, base_version=0, rank=4, alpha=4.0, samples=8, tensors={
        A: np.array(a), B: np.array(100 * b),
        f"{mod2}.lora_A.weight": np.array(a), f"{mod2}.lora_B.weight": np.array(100 * b)})
    got, steps, cut = StepBound(cold_bound=5.0).clip(two, {})
    assert cut == 2 and (steps[MOD] ** 2 + steps[mod2] ** 2) ** 0.5 <= 5.0 * (1 + 1e-6)  # both cut, 5 together
    warm = StepBound(cold_bound=5.0, min_history=1, multiplier=3.0)
    warm.observe({"m1": 1.0})
    assert warm.limits({"m1": 4.0, "m2": 4.0}) == {"m1": pytest.approx(3.0)}  # m2 alone is within the cold bound


def flip_view(core: AggregatorCore, rank: int = 4, alpha: float = 8.0, flip: float = 3.0) -> dict[str, np.ndarray]:
    """What the sign-flipping edge sends: the current global as a rank-4 edge loads it, B x -flip."""
    view = core.strategy.view_for(core.glob, rank=rank, modalities={"audio": 8, "image": 8}, alpha=alpha)
    return {n: (t * (-flip if ".lora_B." in n else 1.0)).astype(np.float32) for n, t in view.items()}


def cosine(x: dict[str, np.ndarray], y: dict[str, np.ndarray]) -> float:
    dot = sum(float(np.sum(x[k] * y[k])) for k in x)
    return dot / (norm_of(x) * norm_of(y))


def flipped_run(tmp: Path, strategy: str, multiplier: float) -> tuple[float, float]:
    """Four rounds, the flipper in every round after the first (B x -3, 10^12 samples claimed).

    Returns the attacked global's cosine with the honest-only global (same rule, same settings) and its
    norm over H, the largest ‖ΔW‖ an honest edge sent.
    """
    cores = {arm: AggregatorCore(cloud_config(tmp / f"{strategy}-{multiplier}-{arm}", ADDR,
                                              aggregation={"buffer_k": 100, "strategy": strategy},
                                              validation={"step_multiplier": multiplier}))
             for arm in ("attacked", "clean")}
    try:
        h = 0.0
        for rnd in range(1, 5):
            for arm, core in cores.items():
                if arm == "attacked" and rnd > 1:
                    send(core, "evil", rnd, flip_view(core), base=core.version, samples=10**12)
                for s in ("a", "b", "c"):
                    t = honest(s, rnd)
                    h = max(h, delta_norm(t))
                    assert feedback(send(core, s, rnd, t, base=core.version), s).accepted[-1] == rnd
                core.aggregate()
        if multiplier and strategy == "fedavg":
            assert cores["attacked"].metrics()["neutralised"]["steps_clipped"] > 0
        hit, clean = global_delta(cores["attacked"]), global_delta(cores["clean"])
        return cosine(hit, clean), norm_of(hit) / h
    finally:
        for core in cores.values():
            core.close()


def test_step_clipping_bounds_how_far_a_sign_flipper_moves_a_weighted_global(tmp_path: Path) -> None:
    """fedavg trusts the claimed samples (capped at half a module): unclipped, the flipper carries the global
    past 1.5 H; clipped, every one of its steps is at most 3 honest medians long and the global stays within 1.2 H.
    """
    _, unclipped = flipped_run(tmp_path, "fedavg", 0.0)
    _, clipped = flipped_run(tmp_path, "fedavg", 3.0)
    assert clipped <= 1.2 < 1.5 < unclipped, (clipped, unclipped)


def test_a_robust_rule_keeps_the_honest_direction_under_a_sign_flipper(tmp_path: Path) -> None:
    """What clipping cannot give a weighted rule: the median ignores the claimed weight, so the flipper is
    outvoted in every coordinate and the global stays close to the honest-only one.  (The synthetic honest
    updates are independent noise around version 0, so even two honest globals agree only to ~0.8.)
    """
    cos, ratio = flipped_run(tmp_path, "median", 3.0)
    cos_fedavg, _ = flipped_run(tmp_path, "fedavg", 3.0)
    assert cos > 0.7 and ratio <= 1.0 and cos_fedavg < 0.5, (cos, ratio, cos_fedavg)


def test_the_first_upload_of_a_new_cloud_is_bounded_by_the_base(tmp_path: Path) -> None:
    """Inside the 10 x ‖W0‖ norm bound but 5 x ‖W0‖ large: accepted, with its step cut to 1 x ‖W0‖."""
    w0 = base_weight_norm()
    t = honest("x", 1)
    big = {n: (v * (5 * w0 / delta_norm(t)) if ".lora_B." in n else v).astype(np.float32) for n, v in t.items()}
    assert 4.9 * w0 < delta_norm(big) < 10 * w0
    core = AggregatorCore(cloud_config(tmp_path, ADDR, aggregation={"buffer_k": 1}))
    try:
        assert feedback(send(core, "x", 1, big), "x").accepted == [1]
        assert core.version == 1 and norm_of(global_delta(core)) <= 1.0 * w0 * (1 + 1e-5)
        assert core.metrics()["neutralised"]["steps_clipped"] >= 1
    finally:
        core.close()


def test_a_restart_re_arms_the_bound_from_the_ledger(tmp_path: Path) -> None:
    cfg = cloud_config(tmp_path, ADDR, aggregation={"buffer_k": 100})
    core = AggregatorCore(cfg)
    try:
        for i, s in enumerate(("a", "b", "c", "d")):
            send(core, s, 1, honest(s, i))
        assert core.admission.steps is not None
        before = {k: list(v) for k, v in core.admission.steps.history.items()}
    finally:
        core.close()
    assert before and all(len(v) == 4 for v in before.values())
    again = AggregatorCore(cfg)
    try:
        assert again.admission.steps is not None
        after = {k: list(v) for k, v in again.admission.steps.history.items()}
        assert after.keys() == before.keys()
        for k, v in before.items():
            np.testing.assert_allclose(after[k], v, rtol=1e-12)
    finally:
        again.close()


def test_a_ledger_from_before_step_clipping_opens_and_gains_the_column(tmp_path: Path) -> None:
    Ledger(tmp_path).close()
    with sqlite3.connect(tmp_path / "ledger.sqlite") as db:
        db.execute("ALTER TABLE updates DROP COLUMN steps")
    Ledger(tmp_path).close()
    with sqlite3.connect(tmp_path / "ledger.sqlite") as db:
        assert "steps" in {r[1] for r in db.execute("PRAGMA table_info(updates)")}


def test_modality_counts_above_the_samples_are_clipped(tmp_path: Path) -> None:
    core = AggregatorCore(cloud_config(tmp_path, ADDR, aggregation={"buffer_k": 100}))
    try:
        body = update_payload(honest("m", 1), site="m", seq=1, base_version=0, fingerprint=fingerprint(), rank=4,
                              samples=8, modalities={"audio": 1000, "image": 3})
        assert feedback(core.ingest(topics.adapter_up("m"), body), "m").accepted == [1]
        assert [p.contribution.modalities for p in core.ledger.pending()] == [{"audio": 8, "image": 3}]
    finally:
        core.close()


def test_the_shrink_is_the_longest_halving_that_fits_when_both_factors_move() -> None:
    """When A and B both move, the step is not linear in λ (λ(δB A_v + B_v δA) + λ² δB δA): the first guess
    λ0 = bound/step can overshoot, and the clip halves λ until the step fits.  For each random upload:
    the result lies on the segment v + λ(x - v), its dense step fits the bound, and λ is the longest of
    λ0, λ0/2, λ0/4, ... that fits (so twice it does not, unless it is λ0 itself)."""
    rng = np.random.default_rng(7)
    halved = 0
    for _ in range(40):
        va, vb = rng.standard_normal((4, 10)).astype(np.float32), rng.standard_normal((6, 4)).astype(np.float32)
        # A = (1+alpha) A_v, B = (1+beta) B_v with alpha*beta = -rho*(alpha+beta): the quadratic term nearly
        # cancels the linear one at lambda = 1, so the step at lambda0 is far above the bound
        # (step(lambda) = lambda * (1 - rho*lambda) * (alpha+beta) * |B_v A_v|)
        alpha, rho = float(rng.uniform(1, 5)), float(rng.uniform(0.7, 0.95))
        beta = -rho * alpha / (alpha + rho)
        a, b = ((1 + alpha) * va).astype(np.float32), ((1 + beta) * vb).astype(np.float32)
        bound = StepBound(multiplier=1.0, min_history=1)
        bound.observe({MOD: dense_step(a, b, va, vb, 1.0) * float(rng.uniform(0.05, 0.9))})
        limit = bound.limits({MOD: 1.0})[MOD]
        got, steps, cut = bound.clip(contribution(a, b, rank=4, alpha=4.0), {A: np.array(va), B: np.array(vb)})
        assert cut == 1
        a2, b2 = got.tensors[A].astype(np.float64), got.tensors[B].astype(np.float64)
        lam = float(np.sum((b2 - vb) * (b - vb)) / np.sum((b - vb).astype(np.float64) ** 2))  # projection on x - v
        np.testing.assert_allclose(b2, vb + lam * (b - vb), atol=1e-5)
        np.testing.assert_allclose(a2, va + lam * (a - va), atol=1e-5)
        assert dense_step(a2, b2, va, vb, 1.0) <= limit * (1 + 1e-6) and steps[MOD] <= limit * (1 + 1e-6)
        lam0 = limit / dense_step(a, b, va, vb, 1.0)
        if lam < lam0 * (1 - 1e-6):
            halved += 1
            twice = 2 * lam
            over = dense_step(va + twice * (a - va), vb + twice * (b - vb), va, vb, 1.0)
            assert over > limit, (lam, lam0)
            assert np.isclose(np.log2(lam0 / lam), round(np.log2(lam0 / lam)), atol=1e-4)  # λ0 / 2^k
    assert halved >= 5  # the case the loop exists for really occurred


def test_a_non_lora_tensor_steps_by_its_plain_distance_and_keeps_its_dtype() -> None:
    """Personal heads shared by the baselines are plain tensors: their step is ‖t - t_v‖, and a clipped
    float16 upload stays float16."""
    rng = np.random.default_rng(11)
    head, vhead = rng.standard_normal((3, 5)).astype(np.float16), rng.standard_normal((3, 5)).astype(np.float16)
    c = Contribution(edge_id="e", seq=1, base_version=0, rank=4, alpha=4.0, samples=8,
                     tensors={"head.weight": np.array(head)})
    view = {"head.weight": np.array(vhead)}
    want = float(np.linalg.norm(head.astype(np.float64) - vhead.astype(np.float64)))
    assert StepBound().steps(c, view) == {"head.weight": pytest.approx(want, rel=1e-6)}
    assert StepBound().steps(c, {}) == {"head.weight": pytest.approx(float(np.linalg.norm(head.astype(np.float64))))}
    bound = StepBound(multiplier=1.0, min_history=1)
    bound.observe({"head.weight": want / 4})
    got, steps, cut = bound.clip(c, view)
    out = got.tensors["head.weight"]
    assert cut == 1 and out.dtype == np.float16
    np.testing.assert_allclose(out.astype(np.float64),
                               vhead.astype(np.float64) + 0.25 * (head.astype(np.float64) - vhead), atol=2e-3)
    assert steps["head.weight"] <= want / 4 * (1 + 1e-3)


def test_the_median_is_over_the_last_window_steps_only() -> None:
    bound = StepBound(multiplier=1.0, min_history=1, window=3)
    for step in (100.0, 100.0, 100.0, 1.0, 2.0, 3.0):
        bound.observe({MOD: step})
    assert bound.limits({MOD: 50.0}) == {MOD: 2.0}  # the three 100s have left the window
