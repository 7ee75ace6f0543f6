"""Properties of the aggregation rules (exactness, identities, truncation error, isolation)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_aggregator.contribution import GlobalState
from cloud_aggregator.strategies import STRATEGIES, get_strategy
from cloud_aggregator.strategies.hetlora import product_norms
from megace_common.lora import modality_of, split_lora
from tests.support.cloud_testkit import effective_delta, make_contribution

FAST = settings(max_examples=25, deadline=None)
ranks_st = st.lists(st.integers(1, 6), min_size=1, max_size=6)
dims_st = st.tuples(st.integers(2, 12), st.integers(2, 12))


def target_delta(cs, module, extra=None):
    w = np.array([c.samples * (1.0 if extra is None else extra[i]) for i, c in enumerate(cs)], dtype=np.float64)
    w = w / w.sum()
    return sum(w[i] * effective_delta(c, module) for i, c in enumerate(cs))


def test_modality_parser():
    assert modality_of("base_model.model.modality_proj.audio.0.lora_A.weight") == "audio"
    assert modality_of("modality_proj.image.fc.weight") == "image"
    assert modality_of("base_model.model.encoder.layer.0.attention.self.query.lora_A.weight") is None
    assert split_lora("x.y.lora_B.weight") == ("x.y", "B")
    assert split_lora("x.y.lora_A.default.weight") == ("x.y", "A")
    assert split_lora("x.y.bias") is None


def test_registry():
    assert set(STRATEGIES) == {"fedavg", "hetlora", "flora", "flexlora", "fedsa", "modality-aware", "norm-clip",
                               "trimmed-mean", "median"}
    with pytest.raises(ValueError, match="unknown strategy"):
        get_strategy("nope")
    assert get_strategy("modality-aware", inner="flora").inner.name == "flora"


@FAST
@given(
    ranks=ranks_st,
    dims=dims_st,
    samples=st.lists(st.integers(1, 50), min_size=6, max_size=6),
    extra=st.lists(st.floats(0.05, 1.0), min_size=6, max_size=6),
    compact=st.booleans(),
)
def test_flora_reproduces_weighted_sum_of_products(ranks, dims, samples, extra, compact):
    mods = {"m": dims}
    cs = [make_contribution(i, r, mods, samples=samples[i], alpha=3.0 + i) for i, r in enumerate(ranks)]
    g = get_strategy("flora", lossless_compaction=compact).aggregate(None, cs, extra[: len(cs)])
    torch.testing.assert_close(g.delta("m"), target_delta(cs, "m", extra), rtol=1e-9, atol=1e-9)
    if not compact:
        assert g.rank_of("m") == sum(ranks)


@FAST
@given(rank=st.integers(1, 8), k=st.integers(1, 7), dims=dims_st, alpha=st.floats(0.5, 64))
def test_fedavg_of_identical_adapters_is_identity(rank, k, dims, alpha):
    mods = {"q": dims, "v": dims[::-1]}
    cs = [make_contribution(i, rank, mods, alpha=alpha, seed=7, samples=3 + i) for i in range(k)]
    s = get_strategy("fedavg")
    g = s.aggregate(None, cs)
    view = s.view_for(g, rank, alpha=alpha)
    assert set(view) == set(cs[0].tensors)
    for name, t in cs[0].tensors.items():
        torch.testing.assert_close(view[name], t, rtol=1e-12, atol=1e-12)


@FAST
@given(ranks=ranks_st, dims=dims_st, edge_rank=st.integers(1, 10), edge_alpha=st.floats(1, 32))
def test_flexlora_truncation_error_is_tail_singular_values(ranks, dims, edge_rank, edge_alpha):
    cs = [make_contribution(i, r, {"m": dims}) for i, r in enumerate(ranks)]
    s = get_strategy("flexlora")
    g = s.aggregate(None, cs)
    target = target_delta(cs, "m")
    torch.testing.assert_close(g.delta("m"), target, rtol=1e-9, atol=1e-9)  # the global itself is exact
    view = s.view_for(g, edge_rank, alpha=edge_alpha)
    approx = (edge_alpha / edge_rank) * view["m.lora_B.weight"] @ view["m.lora_A.weight"]
    sv = np.linalg.svd(target, compute_uv=False)
    expected = np.sqrt((sv[edge_rank:] ** 2).sum())
    assert view["m.lora_A.weight"].shape == (edge_rank, dims[1])
    assert abs(float(np.linalg.norm(target - approx)) - float(expected)) < 1e-8 * (1 + float(sv[0]))


@FAST
@given(ranks=ranks_st, dims=dims_st, edge_rank=st.integers(1, 10), compact=st.booleans())
def test_flora_view_is_best_rank_r_approximation(ranks, dims, edge_rank, compact):
    cs = [make_contribution(i, r, {"m": dims}) for i, r in enumerate(ranks)]
    s = get_strategy("flora", lossless_compaction=compact)
    g = s.aggregate(None, cs)
    assert ("m" in g.meta["svd_sorted"]) == (compact and sum(ranks) > min(dims))
    view = s.view_for(g, edge_rank)
    approx = view["m.lora_B.weight"] @ view["m.lora_A.weight"]
    sv = np.linalg.svd(g.delta("m"), compute_uv=False)
    assert abs(float(np.linalg.norm(g.delta("m") - approx)) - float(np.sqrt((sv[edge_rank:] ** 2).sum()))) < 1e-8 * (
        1 + float(sv[0])
    )


@FAST
@given(
    rank=st.integers(1, 6),
    k=st.integers(1, 6),
    dims=dims_st,
    samples=st.lists(st.integers(1, 40), min_size=6, max_size=6),
)
def test_hetlora_equal_ranks_is_norm_weighted_fedavg(rank, k, dims, samples):
    cs = [make_contribution(i, rank, {"m": dims}, samples=samples[i]) for i in range(k)]
    norms = [float(np.linalg.norm(effective_delta(c, "m"))) for c in cs]
    het = get_strategy("hetlora").aggregate(None, cs)
    avg = get_strategy("fedavg").aggregate(None, cs, norms)
    for name in het.tensors:
        torch.testing.assert_close(het.tensors[name], avg.tensors[name], rtol=1e-9, atol=1e-9)


def test_hetlora_pads_and_truncates():
    cs = [make_contribution(0, 2, {"m": (5, 4)}), make_contribution(1, 6, {"m": (5, 4)})]
    s = get_strategy("hetlora")
    g = s.aggregate(None, cs)
    assert g.rank_of("m") == 6
    view = s.view_for(g, 2, alpha=4.0)
    assert view["m.lora_A.weight"].shape == (2, 4) and view["m.lora_B.weight"].shape == (5, 2)
    torch.testing.assert_close(view["m.lora_A.weight"], g.tensors["m.lora_A.weight"][:2])
    torch.testing.assert_close(view["m.lora_B.weight"] * 2.0, g.tensors["m.lora_B.weight"][:, :2])


def test_product_norms_match_dense():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((4, 3, 7)), rng.standard_normal((4, 5, 3))
    dense = np.linalg.norm(b @ a, axis=(1, 2))
    torch.testing.assert_close(product_norms(a, b), dense)


def test_fedsa_shares_only_a():
    cs = [make_contribution(i, 4, {"m": (6, 5)}, samples=s) for i, s in enumerate([1, 3])]
    s = get_strategy("fedsa")
    g = s.aggregate(None, cs)
    assert set(g.tensors) == {"m.lora_A.weight"}
    torch.testing.assert_close(
        g.tensors["m.lora_A.weight"], 0.25 * cs[0].tensors["m.lora_A.weight"] + 0.75 * cs[1].tensors["m.lora_A.weight"]
    )
    view = s.view_for(g, 4)
    assert set(view) == {"m.lora_A.weight"}
    # an edge that only sends A is enough for fedsa
    cs[0].tensors.pop("m.lora_B.weight")
    assert set(s.aggregate(None, cs).tensors) == {"m.lora_A.weight"}


def test_extras_are_sample_weighted_and_untouched_modules_kept():
    mods = {"m": (3, 3)}
    cs = [make_contribution(i, 2, mods, samples=s, extras={"head.bias": (3,)}) for i, s in enumerate([1, 2])]
    prev = GlobalState(
        version=4,
        tensors={"old.lora_A.weight": np.ones((2, 3), np.float32), "old.lora_B.weight": np.ones((3, 2), np.float32)},
    )
    g = get_strategy("fedavg").aggregate(prev, cs)
    assert g.version == 5
    torch.testing.assert_close(g.tensors["old.lora_A.weight"], np.ones((2, 3), np.float32))
    torch.testing.assert_close(
        g.tensors["head.bias"], (cs[0].tensors["head.bias"] + 2 * cs[1].tensors["head.bias"]) / 3
    )


AUDIO = "enc.modality_proj.audio.0"
IMAGE = "enc.modality_proj.image.0"
SHARED = "enc.layer.0.query"
MODS = {AUDIO: (6, 4), IMAGE: (6, 5), SHARED: (6, 6)}


@FAST
@given(
    n_audio=st.integers(1, 4),
    n_other=st.integers(1, 4),
    inner=st.sampled_from(["fedavg", "flora", "hetlora"]),
    seed=st.integers(0, 1000),
)
def test_modality_aware_ignores_edges_without_the_modality(n_audio, n_other, inner, seed):
    with_audio = [
        make_contribution(i, 3, MODS, modalities={"audio": 5 + i, "image": 2}, samples=20, seed=seed + i)
        for i in range(n_audio)
    ]
    # edges with no audio samples but carrying (arbitrary, even huge) audio-module tensors
    without = [
        make_contribution(100 + i, 3, MODS, modalities={"image": 9}, samples=50, seed=seed + 100 + i)
        for i in range(n_other)
    ]
    for c in without:
        c.tensors[f"{AUDIO}.lora_B.weight"] *= 1e6
    s = get_strategy("modality-aware", inner=inner)
    both = s.aggregate(None, with_audio + without)
    only = s.aggregate(None, with_audio)
    for name in (f"{AUDIO}.lora_A.weight", f"{AUDIO}.lora_B.weight"):
        torch.testing.assert_close(both.tensors[name], only.tensors[name], rtol=1e-12, atol=1e-12)
    # audio is weighted by audio samples, not total samples
    if inner == "flora":
        exp = target_delta(with_audio, AUDIO, [c.modalities["audio"] / c.samples for c in with_audio])
        torch.testing.assert_close(both.delta(AUDIO), exp, rtol=1e-9, atol=1e-9)
    if inner == "fedavg":
        w = np.array([c.modalities["audio"] for c in with_audio], dtype=np.float64)
        exp_a = sum(w[i] * c.tensors[f"{AUDIO}.lora_A.weight"] for i, c in enumerate(with_audio)) / w.sum()
        torch.testing.assert_close(both.tensors[f"{AUDIO}.lora_A.weight"], exp_a, rtol=1e-12, atol=1e-12)
    # shared modules do see everyone
    assert not np.allclose(both.delta(SHARED), only.delta(SHARED))


def test_modality_aware_keeps_global_and_filters_views():
    prev_a = np.full((3, 4), 7.0, dtype=np.float64)
    prev = GlobalState(
        version=1,
        tensors={f"{AUDIO}.lora_A.weight": prev_a, f"{AUDIO}.lora_B.weight": np.ones((6, 3), dtype=np.float64)},
    )
    cs = [make_contribution(i, 3, MODS, modalities={"image": 4}) for i in range(3)]
    s = get_strategy("modality-aware")
    g = s.aggregate(prev, cs)
    assert np.array_equal(g.tensors[f"{AUDIO}.lora_A.weight"], prev_a)  # nobody had audio: untouched
    view = s.view_for(g, 3, modalities={"image": 1})
    assert not any(modality_of(n) == "audio" for n in view)
    assert f"{IMAGE}.lora_A.weight" in view and f"{SHARED}.lora_A.weight" in view
    assert any(modality_of(n) == "audio" for n in s.view_for(g, 3, modalities={"audio": 1}))


def test_weights_validated():
    cs = [make_contribution(0, 2, {"m": (3, 3)})]
    s = get_strategy("fedavg")
    with pytest.raises(ValueError):
        s.aggregate(None, cs, [1.0, 2.0])
    with pytest.raises(ValueError):
        s.aggregate(None, cs, [-1.0])


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_view_has_edge_shapes_and_float32_in_float32_out(name):
    mods = {"q": (8, 6)}
    cs = [make_contribution(i, r, mods) for i, r in enumerate([2, 4, 8])]
    for c in cs:
        c.tensors = {k: v.astype(np.float32) for k, v in c.tensors.items()}
    s = get_strategy(name)
    g = s.aggregate(None, cs)
    for r in (1, 4, 8, 12):
        v = s.view_for(g, r, alpha=16)
        assert v["q.lora_A.weight"].shape == (r, 6)
        assert v["q.lora_A.weight"].dtype == np.float32
        if s.shares_b:
            assert v["q.lora_B.weight"].shape == (8, r)
        else:
            assert "q.lora_B.weight" not in v
