"""Every aggregation rule, the FedBuff step and the staleness discounts against an independent numpy model.

The expectations come from ``np_reference`` (plain numpy written from the documented formulas), never
from the code under test, on small random heterogeneous inputs: ranks, alphas, sample counts,
modality sets, staleness discounts, extra tensors and a previous global all vary.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_aggregator.contribution import Contribution, GlobalState
from cloud_aggregator.errors import FutureBase, StaleUpdate
from cloud_aggregator.mixing import mix, step_sizes
from cloud_aggregator.staleness import BufferPolicy, Constant, Hinge, Polynomial, StalenessPolicy, get_discount
from cloud_aggregator.strategies import get_strategy
from tests.support import np_reference as ref
from tests.support.cloud_testkit import make_contribution

FAST = settings(max_examples=30, deadline=None)
AUDIO, IMAGE, SHARED = "enc.modality_proj.audio", "enc.modality_proj.image", "enc.layer.0.query"
MODS = {AUDIO: (5, 3), IMAGE: (5, 4), SHARED: (5, 6)}
EXTRA = {"head.bias": (4,), f"{AUDIO}.scale": (3,)}  # a plain tensor, and one tied to the audio modality
TOL = {"rtol": 1e-9, "atol": 1e-10}

edge_st = st.fixed_dictionaries(
    {
        "rank": st.integers(1, 5),
        "alpha": st.sampled_from([1.0, 2.0, 3.5, 8.0]),
        "samples": st.integers(0, 40),
        "audio": st.integers(0, 9),
        "image": st.integers(0, 9),
        "d": st.floats(0.05, 1.0),
    }
)
edges_st = st.lists(edge_st, min_size=1, max_size=5)


def build(edges: list[dict], seed: int) -> tuple[list[Contribution], list[float]]:
    cs = [
        make_contribution(i, e["rank"], MODS, alpha=e["alpha"], samples=e["samples"], seed=seed * 31 + i,
                          modalities={"audio": e["audio"], "image": e["image"]}, extras=EXTRA)
        for i, e in enumerate(edges)
    ]
    return cs, [e["d"] for e in edges]


def as_up(c: Contribution) -> ref.Up:
    return ref.Up({n: t.astype(np.float64) for n, t in c.tensors.items()}, c.rank, c.alpha, c.samples,
              dict(c.modalities))


def previous_global() -> GlobalState:
    """A version-7 global with a module nobody uploads and every module at rank 3."""
    g = torch.Generator().manual_seed(5)
    t = {"kept.lora_A.weight": torch.randn(2, 3, generator=g, dtype=torch.float64),
         "kept.lora_B.weight": torch.randn(3, 2, generator=g, dtype=torch.float64),
         "head.bias": torch.randn(4, generator=g, dtype=torch.float64)}
    for m, (o, i) in MODS.items():
        t[f"{m}.lora_A.weight"] = torch.randn(3, i, generator=g, dtype=torch.float64)
        t[f"{m}.lora_B.weight"] = torch.randn(o, 3, generator=g, dtype=torch.float64)
    return GlobalState(version=7, tensors={n: v.numpy() for n, v in t.items()}, strategy="x")


def np_tensors(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return dict(tensors)


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for name, w in want.items():
        np.testing.assert_allclose(got[name], w, err_msg=name, **TOL)


FACTOR_RULES = [("fedavg", {}), ("hetlora", {}), ("fedsa", {}), ("modality-aware", {"inner": "fedavg"}),
                ("modality-aware", {"inner": "hetlora"}), ("modality-aware", {"inner": "fedsa"})]


@pytest.mark.parametrize("name,options", FACTOR_RULES, ids=lambda x: str(x))
@FAST
@given(edges=edges_st, seed=st.integers(0, 10_000), with_prev=st.booleans())
def test_factor_rules_match_numpy(name, options, edges, seed, with_prev):
    cs, ds = build(edges, seed)
    prev = previous_global() if with_prev else None
    strategy = get_strategy(name, **options)
    rule = options.get("inner", name)
    weight = ref.modality_weight if name == "modality-aware" else ref.samples_weight
    prev_np = np_tensors(prev.tensors) if prev is not None else None
    g = strategy.aggregate(prev, cs, ds)
    assert g.version == (8 if with_prev else 1) and g.strategy == name
    assert_same(g.tensors, ref.aggregate(rule, prev_np, [as_up(c) for c in cs], ds, weight))


@pytest.mark.parametrize("name", ["hetlora", "fedavg"])
def test_all_zero_weights_fall_back_to_a_plain_mean(name):
    """Fresh LoRA (B = 0) has zero norm, and edges may report 0 samples: then every edge counts equally."""
    cs = [make_contribution(i, 2, {"m": (3, 4)}, samples=0 if name == "fedavg" else 5) for i in range(3)]
    if name == "hetlora":
        for c in cs:
            c.tensors["m.lora_B.weight"][:] = 0.0
    g = get_strategy(name).aggregate(None, cs)
    mean_a = sum(c.tensors["m.lora_A.weight"] for c in cs) / 3
    np.testing.assert_allclose(g.tensors["m.lora_A.weight"], mean_a, **TOL)


STACKED_RULES = [("flora", {"lossless_compaction": False}), ("flora", {}), ("flexlora", {}),
                 ("modality-aware", {"inner": "flora"}), ("modality-aware", {"inner": "flexlora"})]


@pytest.mark.parametrize("name,options", STACKED_RULES, ids=lambda x: str(x))
@FAST
@given(edges=edges_st, seed=st.integers(0, 10_000))
def test_stacked_rules_store_the_exact_weighted_sum_of_products(name, options, edges, seed):
    cs, ds = build(edges, seed)
    weight = ref.modality_weight if name == "modality-aware" else ref.samples_weight
    ups = [as_up(c) for c in cs]
    strategy = get_strategy(name, **options)
    g = strategy.aggregate(None, cs, ds)
    for m, (o, i) in MODS.items():
        members = ref.eligible(ups, ds, m, weight, need_b=True)
        if not members:
            assert f"{m}.lora_A.weight" not in g.tensors
            continue
        target = ref.product_target(ups, m, ds, weight)
        a, b = g.tensors[f"{m}.lora_A.weight"], g.tensors[f"{m}.lora_B.weight"]
        np.testing.assert_allclose(b @ a, target, **TOL)
        total_rank = sum(u.rank for u, _, _ in members)
        stacked = options.get("inner", name) == "flora" and (
            options.get("lossless_compaction") is False or total_rank <= min(o, i))
        if stacked:  # FLoRA's stacked form: A = [A_1; …; A_K], B = [w_1 s_1 B_1, …, w_K s_K B_K]
            wn = ref.normalized([n * d for _, n, d in members])
            np.testing.assert_allclose(a, np.concatenate([ref.pairs(u)[m]["A"] for u, _, _ in members]), **TOL)
            scaled = [w * u.s * ref.pairs(u)[m]["B"] for w, (u, _, _) in zip(wn, members, strict=True)]
            want_b = np.concatenate(scaled, axis=1)
            np.testing.assert_allclose(b, want_b, **TOL)
            if name == "flora":
                assert m not in g.meta["svd_sorted"]
        else:  # balanced SVD form: A Aᵀ = Bᵀ B = diag(singular values of the target, descending)
            sv = np.linalg.svd(target, compute_uv=False)
            k = a.shape[0]
            assert k <= min(o, i)
            np.testing.assert_allclose(a @ a.T, np.diag(sv[:k]), rtol=1e-7, atol=1e-9)
            np.testing.assert_allclose(b.T @ b, np.diag(sv[:k]), rtol=1e-7, atol=1e-9)
            if name == "flora":
                assert m in g.meta["svd_sorted"]


@pytest.mark.parametrize("name,options", FACTOR_RULES + STACKED_RULES, ids=lambda x: str(x))
@FAST
@given(edges=edges_st, seed=st.integers(0, 10_000), rank=st.integers(1, 7), alpha=st.sampled_from([None, 1.0, 6.0]),
       audio=st.integers(0, 1))
def test_views_match_numpy(name, options, edges, seed, rank, alpha, audio):
    """A factor rule's view is the first r components, B divided by the edge's alpha/r; a stacked rule's
    view reproduces the best rank-r approximation; modality-aware leaves out modules of absent modalities."""
    cs, ds = build(edges, seed)
    strategy = get_strategy(name, **options)
    g = strategy.aggregate(previous_global() if strategy.shares_b else None, cs, ds)
    modalities = {"audio": audio, "image": 1}
    view = strategy.view_for(g, rank, modalities=modalities, alpha=alpha)
    scale = 1.0 if alpha is None else alpha / rank
    rule = options.get("inner", name)
    sorted_modules = set(g.meta.get("svd_sorted", []))
    expected_names = set()
    for n, t in g.tensors.items():
        p = ref.split(n)
        if name == "modality-aware" and ref.modality(n) is not None and modalities[ref.modality(n)] == 0:
            continue
        if p is not None and p[1] == "B" and not strategy.shares_b:
            continue
        expected_names.add(n)
        if p is None:
            np.testing.assert_array_equal(view[n], t)
        elif rule != "flora" or p[0] in sorted_modules:  # a plain slice, bit for bit (no SVD recomputed)
            want = ref.fit_rank(t, p[1], rank) / (scale if p[1] == "B" else 1.0)
            np.testing.assert_array_equal(view[n], want, err_msg=n)
    assert set(view) == expected_names
    if rule == "flora":  # stacked modules: the truncated SVD of the stored product
        for m in {p[0] for n in view if (p := ref.split(n))}:
            delta = g.tensors[f"{m}.lora_B.weight"] @ g.tensors[f"{m}.lora_A.weight"]
            sv = np.linalg.svd(delta, compute_uv=False)
            if rank < len(sv) and sv[rank - 1] - sv[rank] < 1e-6 * (1 + sv[0]):
                continue  # tied singular values: the best rank-r fit is not unique
            got = scale * view[f"{m}.lora_B.weight"] @ view[f"{m}.lora_A.weight"]
            np.testing.assert_allclose(got, ref.best_rank(delta, rank), rtol=1e-6, atol=1e-8 * (1 + sv[0]))


@pytest.mark.parametrize("name,options", [("fedavg", {}), ("hetlora", {}), ("fedsa", {}),
                                          ("modality-aware", {"inner": "fedavg"})], ids=lambda x: str(x))
@FAST
@given(edges=edges_st, seed=st.integers(0, 10_000), grow=st.booleans())
def test_fedbuff_step_sizes_and_mix_match_numpy(name, options, edges, seed, grow):
    """``ᾱ = Σ d n / Σ n`` per module over the edges eligible for it, then ``x + ᾱ (agg - x)``."""
    cs, ds = build(edges, seed)
    strategy = get_strategy(name, **options)
    weight = ref.modality_weight if name == "modality-aware" else ref.samples_weight
    ups = [as_up(c) for c in cs]
    want_steps = ref.steps(ups, ds, weight)
    got_steps = step_sizes(strategy, cs, ds)
    assert set(got_steps) == set(want_steps)
    for k, v in want_steps.items():
        assert got_steps[k] == pytest.approx(v, rel=1e-12), k
    prev = previous_global()
    if grow:  # a previous global of lower rank than the aggregate: the rank axis is zero-padded
        prev = GlobalState(7, {n: (t[:1] if ".lora_A." in n else t[:, :1] if ".lora_B." in n else t)
                                 for n, t in prev.tensors.items()})
    agg = strategy.aggregate(prev, cs, ds)
    got = mix(prev.tensors, agg.tensors, got_steps)
    assert_same(got, ref.mix(np_tensors(prev.tensors), np_tensors(agg.tensors), want_steps))


def test_a_lone_stale_update_moves_the_global_by_its_discount():
    """The FedBuff step for one update of staleness s is exactly (1+s)^-1/2 of the way (not a replacement)."""
    prev = GlobalState(3, {"m.lora_A.weight": np.zeros((2, 3), dtype=np.float64),
                             "m.lora_B.weight": np.zeros((4, 2), dtype=np.float64)})
    c = make_contribution(0, 2, {"m": (4, 3)}, alpha=2.0, base_version=0)
    d = (1 + 3) ** -0.5  # staleness 3 under the default polynomial discount, a = 0.5
    assert StalenessPolicy().weight(3, 0) == pytest.approx(d, rel=1e-15)
    s = get_strategy("fedavg")
    new = mix(prev.tensors, s.aggregate(prev, [c], [d]).tensors, step_sizes(s, [c], [d]))
    np.testing.assert_allclose(new["m.lora_A.weight"], 0.5 * c.tensors["m.lora_A.weight"], **TOL)
    np.testing.assert_allclose(new["m.lora_B.weight"], 0.5 * c.tensors["m.lora_B.weight"], **TOL)


# ---- staleness --------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(a=st.floats(0, 4), b=st.integers(0, 10), s=st.integers(0, 500))
def test_discounts_follow_their_formulas(a, b, s):
    assert Polynomial(a=a)(s) == pytest.approx(ref.polynomial(s, a), rel=1e-12)
    assert get_discount("polynomial", a=a)(s) == pytest.approx(ref.polynomial(s, a), rel=1e-12)
    assert Hinge(a=a, b=b)(s) == pytest.approx(ref.hinge(s, a, b), rel=1e-12)
    assert get_discount("hinge", a=a, b=b)(s) == pytest.approx(ref.hinge(s, a, b), rel=1e-12)
    assert Constant()(s) == 1.0 and get_discount("constant")(s) == 1.0


def test_discount_defaults_are_the_documented_ones():
    assert Polynomial()(3) == pytest.approx(0.5)  # a = 0.5: FedAsync's default
    assert Hinge()(4) == 1.0 and Hinge()(5) == pytest.approx(1 / 11)  # a = 10, b = 4
    assert StalenessPolicy().max_staleness == 16
    assert StalenessPolicy().discount == Polynomial(0.5)
    assert Polynomial(a=0)(7) == 1.0 and Hinge(a=0, b=0)(9) == 1.0  # zero is a valid parameter
    with pytest.raises(ValueError, match=r"^a must be >= 0$"):
        Polynomial(a=-0.1)
    for bad in (lambda: Hinge(a=-1), lambda: Hinge(b=-1)):
        with pytest.raises(ValueError, match=r"^a and b must be >= 0$"):
            bad()
    with pytest.raises(ValueError, match=r"^unknown discount 'exp'; known: \['constant', 'hinge', 'polynomial'\]$"):
        get_discount("exp")


@settings(max_examples=100, deadline=None)
@given(current=st.integers(0, 60), back=st.integers(-3, 60), limit=st.one_of(st.none(), st.integers(0, 20)),
       a=st.floats(0.1, 2))
def test_staleness_policy_weight_refuse_or_discount(current, back, limit, a):
    base = current - back
    p = StalenessPolicy(Polynomial(a=a), max_staleness=limit)
    if base > current:
        with pytest.raises(FutureBase, match=f"base {base} > current {current}"):
            p.weight(current, base)
    elif limit is not None and back > limit:
        with pytest.raises(StaleUpdate, match=f"staleness {back} > max {limit}"):
            p.weight(current, base)
    else:
        assert p.weight(current, base) == pytest.approx(ref.polynomial(back, a), rel=1e-12)


def test_buffer_policy_boundaries():
    b = BufferPolicy(k=2, period_s=5.0, min_updates=2)
    assert math.isinf(BufferPolicy(k=2).next_deadline())
    b.start(10.0)
    assert b.pending == 0 and b.next_deadline() == 15.0
    b.arrived()
    assert not b.should_aggregate(15.0)  # timer due but below min_updates
    b.arrived()
    assert b.should_aggregate(10.0)  # k reached, timer irrelevant
    b.aggregated(12.0, consumed=1)
    assert b.pending == 1 and b.window_start == 12.0
    b.arrived()
    b.aggregated(13.0, consumed=5)
    assert b.pending == 0
    t = BufferPolicy(k=10, period_s=5.0)
    t.start(0.0, pending=1)
    assert not t.should_aggregate(4.999) and t.should_aggregate(5.0)  # the timer fires at exactly the period
    assert BufferPolicy(k=1).should_aggregate(0.0) is False  # nothing buffered
    for bad in ({"k": 0}, {"min_updates": 0}):
        with pytest.raises(ValueError, match=r"^k and min_updates must be >= 1$"):
            BufferPolicy(**bad)
    for bad in ({"period_s": 0.0}, {"period_s": -1.0}):
        with pytest.raises(ValueError, match=r"^period_s must be > 0$"):
            BufferPolicy(**bad)
    assert BufferPolicy(k=1, min_updates=1, period_s=0.1).period_s == 0.1


# ---- registry, wrapper and edge cases the property tests rarely draw -----------------------------------


def test_registry_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"^unknown strategy 'nope'; known: \['fedavg', 'fedsa', 'flexlora', "
                                         r"'flora', 'hetlora', 'median', 'modality-aware', 'norm-clip', "
                                         r"'trimmed-mean'\]$"):
        get_strategy("nope")
    with pytest.raises(ValueError, match=r"^modality-aware cannot wrap itself$"):
        get_strategy("modality-aware", inner=get_strategy("modality-aware"))
    wrapped = get_strategy("modality-aware", inner="flora", lossless_compaction=False)
    assert wrapped.factor_space is False and wrapped.inner.lossless_compaction is False
    assert get_strategy("modality-aware", inner="fedsa").shares_b is False
    assert get_strategy("modality-aware").factor_space is True and get_strategy("modality-aware").shares_b is True
    cs = [make_contribution(0, 2, {"m": (3, 3)})]
    with pytest.raises(ValueError, match=r"^one weight per contribution$"):
        get_strategy("fedavg").aggregate(None, cs, [1.0, 1.0])
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match=r"^weights must be non-negative numbers$"):
            get_strategy("fedavg").aggregate(None, cs, [bad])


def test_an_infinite_weight_falls_back_to_a_plain_mean():
    cs = [make_contribution(i, 2, {"m": (3, 4)}) for i in range(2)]
    g = get_strategy("fedavg").aggregate(None, cs, [float("inf"), 1.0])
    mean_a = (cs[0].tensors["m.lora_A.weight"] + cs[1].tensors["m.lora_A.weight"]) / 2
    np.testing.assert_allclose(g.tensors["m.lora_A.weight"], mean_a, **TOL)


def test_fedbuff_step_is_one_when_no_edge_reports_samples_and_a_shrunk_rank_is_not_padded():
    cs = [make_contribution(i, 2, {"m": (3, 4)}, samples=0) for i in range(2)]
    s = get_strategy("fedavg")
    assert step_sizes(s, cs, [0.5, 0.25]) == {"m": 1.0}
    prev = GlobalState(1, {"m.lora_A.weight": np.ones((5, 4), dtype=np.float64),
                             "m.lora_B.weight": np.ones((3, 5), dtype=np.float64)})
    agg = s.aggregate(prev, cs, [0.5, 0.25])
    out = mix(prev.tensors, agg.tensors, {"m": 1.0})
    assert out["m.lora_A.weight"].shape == (2, 4)  # a full step is the aggregate itself, rank 2
    torch.testing.assert_close(out["m.lora_A.weight"], agg.tensors["m.lora_A.weight"], rtol=0, atol=0)


def test_flora_remembers_which_modules_are_in_svd_form_across_versions():
    big = {"wide": (3, 3), "tall": (3, 3)}
    g1 = get_strategy("flora").aggregate(None, [make_contribution(i, 2, big) for i in range(3)])
    assert g1.meta["svd_sorted"] == ["tall", "wide"]  # Σ r = 6 > min(3, 3): compacted
    only_wide = [make_contribution(7, 1, {"wide": (3, 3)})]
    g2 = get_strategy("flora").aggregate(g1, only_wide)
    assert g2.meta["svd_sorted"] == ["tall"]  # "wide" is a stacked rank-1 module now; "tall" kept its form
    assert g2.version == 2 and np.array_equal(g2.tensors["tall.lora_A.weight"], g1.tensors["tall.lora_A.weight"])


def test_hetlora_norms_are_exact_for_small_updates():
    """‖B A‖_F for updates far below 1 (typical of one local round), against the dense product."""
    from cloud_aggregator.strategies.hetlora import product_norms

    g = torch.Generator().manual_seed(3)
    a = 1e-2 * torch.randn(4, 3, 7, generator=g, dtype=torch.float64).numpy()
    b = 1e-2 * torch.randn(4, 5, 3, generator=g, dtype=torch.float64).numpy()
    want = [np.linalg.norm(b[k] @ a[k]) for k in range(4)]
    np.testing.assert_allclose(product_norms(a, b), want, rtol=1e-10)


@pytest.mark.parametrize("ranks", [(2, 3, 3), (3, 3, 3)], ids=["mixed-ranks", "equal-ranks"])
@pytest.mark.parametrize("name,options", FACTOR_RULES + STACKED_RULES, ids=lambda x: str(x))
def test_half_precision_uploads_are_aggregated_in_float32(name, options, ranks):
    """fp16 uploads (the wire's compact form) are summed in float32, never in half precision, nor in float64."""
    cs = [make_contribution(i, r, MODS, samples=n, modalities={"audio": 1, "image": 2}, extras=EXTRA)
          for i, (r, n) in enumerate(zip(ranks, (1, 3, 2), strict=True))]
    for c in cs:
        c.tensors = {k: v.astype(np.float16) for k, v in c.tensors.items()}
    ups = [as_up(c) for c in cs]
    g = get_strategy(name, **options).aggregate(None, cs)
    assert {t.dtype for t in g.tensors.values()} == {np.dtype(np.float32)}
    rule = options.get("inner", name)
    weight = ref.modality_weight if name == "modality-aware" else ref.samples_weight
    if rule in ("flora", "flexlora"):
        for m in MODS:
            f64 = np.float64
            got = g.tensors[f"{m}.lora_B.weight"].astype(f64) @ g.tensors[f"{m}.lora_A.weight"].astype(f64)
            np.testing.assert_allclose(got, ref.product_target(ups, m, None, weight), rtol=1e-4, atol=1e-5)
    else:
        for n, w in ref.aggregate(rule, None, ups, None, weight).items():
            np.testing.assert_allclose(g.tensors[n], w, rtol=1e-6, atol=1e-6)


def test_a_zero_weight_is_allowed_and_silences_that_edge():
    cs = [make_contribution(i, 2, {"m": (3, 4)}) for i in range(2)]
    g = get_strategy("fedavg").aggregate(None, cs, [0.0, 1.0])
    torch.testing.assert_close(g.tensors["m.lora_A.weight"], cs[1].tensors["m.lora_A.weight"], rtol=0, atol=0)


def test_views_send_only_the_factors_the_rule_shares():
    """Even if a global holds a B (an older version did), fedsa never sends one; a lone B is never sent as A."""
    g = GlobalState(3, {"m.lora_A.weight": np.ones((2, 3), np.float32), "m.lora_B.weight": np.ones((4, 2), np.float32),
                          "n.lora_B.weight": np.ones((4, 2), np.float32)})
    assert set(get_strategy("fedsa").view_for(g, 2)) == {"m.lora_A.weight"}
    assert set(get_strategy("fedavg").view_for(g, 2)) == {"m.lora_A.weight", "m.lora_B.weight", "n.lora_B.weight"}


def test_small_weights_are_normalised_not_replaced_by_a_mean():
    cs = [make_contribution(i, 2, {"m": (3, 4)}, samples=1) for i in range(2)]
    g = get_strategy("fedavg").aggregate(None, cs, [0.2, 0.1])  # Σ w = 0.3 < 1
    want = (2 * cs[0].tensors["m.lora_A.weight"] + cs[1].tensors["m.lora_A.weight"]) / 3
    np.testing.assert_allclose(g.tensors["m.lora_A.weight"], want, **TOL)


def test_an_edge_without_b_is_left_out_of_a_rule_that_needs_b():
    cs = [make_contribution(i, 2, {"m": (3, 4)}, samples=n) for i, n in enumerate([5, 1, 3])]
    del cs[0].tensors["m.lora_B.weight"]
    g = get_strategy("fedavg").aggregate(None, cs)
    assert_same(g.tensors, ref.aggregate("fedavg", None, [as_up(c) for c in cs]))  # edges 1 and 2, 1:3
