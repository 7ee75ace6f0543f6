"""The robust rules, the share cap, the factor gauge fix, content digests and the log limiter, each
against a numpy expectation written from its docstring."""

from __future__ import annotations

import logging
import math
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch

from cloud_aggregator.admission import content_digest
from cloud_aggregator.balance import balance
from cloud_aggregator.ledger import Ledger
from cloud_aggregator.ratelog import RateLimitedLog
from cloud_aggregator.strategies import get_strategy
from cloud_aggregator.strategies.base import cap_shares
from tests.support.cloud_testkit import make_contribution

MODS = {"q": (9, 7), "v": (6, 11)}


def dense(c, m: str) -> np.ndarray:
    t = {n: v.astype(np.float64) for n, v in c.tensors.items()}
    return c.scaling * t[f"{m}.lora_B.weight"] @ t[f"{m}.lora_A.weight"]


def best_rank(d: np.ndarray, r: int) -> np.ndarray:
    u, s, vh = np.linalg.svd(d, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


def global_dense(g, m: str) -> np.ndarray:
    return g.tensors[f"{m}.lora_B.weight"].astype(np.float64) @ g.tensors[f"{m}.lora_A.weight"].astype(np.float64)


def batch(ranks=(2, 3, 4, 2), extras: bool = False):
    return [make_contribution(i, r, MODS, samples=10 * (i + 1), extras={"head.bias": (5,)} if extras else None)
            for i, r in enumerate(ranks)]


@pytest.mark.parametrize("name,trim", [("median", lambda k: (k - 1) // 2),
                                       ("trimmed-mean", lambda k: min(math.ceil(0.2 * k), (k - 1) // 2))])
@pytest.mark.parametrize("ranks", [(2, 3, 4, 2), (1, 4, 2), (3, 2, 2, 4, 1, 3, 2)])
def test_coordinatewise_rules_are_the_trimmed_statistic_at_the_largest_rank(name, trim, ranks):
    cs = batch(ranks, extras=True)
    g = get_strategy(name).aggregate(None, cs)
    k = len(cs)
    for m in MODS:
        stack = np.sort(np.stack([dense(c, m) for c in cs]), axis=0)
        t = trim(k)
        want = stack[t : k - t].mean(axis=0)
        if name == "median":
            np.testing.assert_allclose(want, np.median(stack, axis=0), atol=1e-12)
        r = max(ranks)
        assert g.tensors[f"{m}.lora_A.weight"].shape[0] == min(r, *want.shape)  # the rank the wire needs
        np.testing.assert_allclose(global_dense(g, m), best_rank(want, r), rtol=1e-4, atol=1e-6)
    ex = np.sort(np.stack([c.tensors["head.bias"] for c in cs]), axis=0)
    np.testing.assert_allclose(g.tensors["head.bias"], ex[trim(k) : k - trim(k)].mean(axis=0), atol=1e-12)


def test_median_ignores_one_inflated_edge_and_claimed_samples():
    cs = batch((4, 4, 4, 4))
    evil = cs[3]
    evil.tensors["q.lora_B.weight"] = evil.tensors["q.lora_B.weight"] * 1e6
    evil.samples = 10**12
    g = get_strategy("median").aggregate(None, cs)
    # every coordinate of a median of 4 with one outlier lies within the honest ones' range, and truncating
    # by SVD never adds Frobenius norm: the elementwise max |honest| bounds the global
    envelope = np.abs(np.stack([dense(c, "q") for c in cs[:3]])).max(axis=0)
    assert np.linalg.norm(global_dense(g, "q")) <= np.linalg.norm(envelope) * (1 + 1e-9)
    fedavg = get_strategy("fedavg").aggregate(None, cs)
    assert np.linalg.norm(global_dense(fedavg, "q")) > 1e3 * np.linalg.norm(global_dense(g, "q"))


@pytest.mark.parametrize("inner", ["fedavg", "flexlora"])
@pytest.mark.parametrize("max_norm", [0.0, 5.0])
def test_norm_clip_is_the_inner_rule_over_clipped_updates(inner, max_norm):
    cs = batch((2, 3, 4, 2))
    cs[1].tensors["q.lora_B.weight"] *= 50.0
    g = get_strategy("norm-clip", inner=inner, max_norm=max_norm).aggregate(None, cs)
    w = np.array([c.samples for c in cs], dtype=np.float64)
    w /= w.sum()
    for m in MODS:
        norms = np.array([np.linalg.norm(dense(c, m)) for c in cs])
        bound = max_norm or float(np.quantile(norms, 0.5))
        f = np.minimum(1.0, bound / norms)
        if inner == "flexlora":
            want = sum(wk * fk * dense(c, m) for wk, fk, c in zip(w, f, cs, strict=True))
            np.testing.assert_allclose(global_dense(g, m), want, rtol=1e-6, atol=1e-9)
        else:
            r = max(c.rank for c in cs)
            pad_a = [np.pad(c.tensors[f"{m}.lora_A.weight"], ((0, r - c.rank), (0, 0))) for c in cs]
            pad_b = [np.pad(c.scaling * c.tensors[f"{m}.lora_B.weight"], ((0, 0), (0, r - c.rank)))
                     for c in cs]
            np.testing.assert_allclose(g.tensors[f"{m}.lora_A.weight"], sum(
                wk * a for wk, a in zip(w, pad_a, strict=True)), rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(g.tensors[f"{m}.lora_B.weight"], sum(
                wk * fk * b for wk, fk, b in zip(w, f, pad_b, strict=True)), rtol=1e-9, atol=1e-12)
    assert get_strategy("norm-clip", inner="modality-aware").wants("x.modality_proj.audio.y", {"audio": 0}) is False
    with pytest.raises(ValueError, match="norm-clip needs"):
        get_strategy("norm-clip", multiplier=0.0)


@pytest.mark.parametrize(
    "w,cap,want",
    [([97, 1, 1, 1], 0.5, [0.5, 1 / 6, 1 / 6, 1 / 6]),
     ([6, 3, 1], 0.5, [0.5, 0.375, 0.125]),
     ([5, 4, 1], 0.4, [0.4, 0.4, 0.2]),  # two rounds of water-filling
     ([9, 1], 0.5, [0.5, 0.5]),  # K x cap = 1: uniform
     ([9, 1, 0], 0.3, [1 / 3, 1 / 3, 1 / 3]),  # infeasible: uniform
     ([1, 0, 0], 0.5, [0.5, 0.25, 0.25]),  # zero weights share the rest equally
     ([6, 3, 1], 1.0, [0.6, 0.3, 0.1])],
)
def test_share_cap_water_fills(w, cap, want):
    x = np.array(w, dtype=np.float64)
    got = cap_shares(x / x.sum(), cap)
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_the_core_caps_every_rule_through_its_wrappers():
    s = get_strategy("norm-clip", inner="modality-aware")
    s.cap_share(0.5)
    assert s.inner.max_share == 0.5 and s.inner.inner.max_share == 0.5
    cs = batch((4, 4, 4))
    cs[0].samples = 10**9
    g = s.aggregate(None, cs)
    want = 0.5 * cs[0].tensors["q.lora_A.weight"] + sum(
        c.samples / (cs[1].samples + cs[2].samples) * 0.5 * c.tensors["q.lora_A.weight"] for c in cs[1:])
    torch.testing.assert_close(g.tensors["q.lora_A.weight"], want)
    with pytest.raises(ValueError):
        s.cap_share(0.0)


def test_balance_fixes_the_gauge_exactly_and_leaves_honest_factors_alone():
    rho = {"q": 1.0, "v": 2.0}
    c = make_contribution(0, 4, MODS)
    for m, r in rho.items():  # honest: A at its reference row scale
        a = c.tensors[f"{m}.lora_A.weight"]
        c.tensors[f"{m}.lora_A.weight"] = a / np.linalg.norm(a) * r * 2.0
    same, n = balance(c, rho, 4.0)
    assert n == 0 and same is c
    evil = make_contribution(0, 4, MODS)
    evil.tensors = dict(c.tensors)
    evil.tensors["q.lora_A.weight"] = c.tensors["q.lora_A.weight"] * 1e4
    evil.tensors["q.lora_B.weight"] = c.tensors["q.lora_B.weight"] * 1e-4
    fixed, n = balance(evil, rho, 4.0)
    assert n == 1 and fixed.tensors["v.lora_A.weight"] is evil.tensors["v.lora_A.weight"]
    assert float(np.linalg.norm(fixed.tensors["q.lora_A.weight"])) / 2.0 == pytest.approx(4.0)
    np.testing.assert_allclose(dense(fixed, "q"), dense(evil, "q"), rtol=1e-9)
    # a row of A shrunk to nothing, its B column blown up: ΔW barely changes, B is cut to 4 ||ΔW|| / rho
    row = make_contribution(0, 4, MODS)
    row.tensors = dict(c.tensors)
    a, b = c.tensors["q.lora_A.weight"].copy(), c.tensors["q.lora_B.weight"].copy()
    a[0] *= 1e-6
    b[:, 0] *= 1e6
    row.tensors["q.lora_A.weight"], row.tensors["q.lora_B.weight"] = a, b
    fixed, n = balance(row, rho, 4.0)
    d = np.linalg.norm(dense(row, "q"))
    b_norm = float(np.linalg.norm(fixed.tensors["q.lora_B.weight"]))
    assert n == 1 and b_norm * row.scaling == pytest.approx(4.0 * d / 1.0)
    only_a = make_contribution(0, 4, MODS)
    only_a.tensors = {"q.lora_A.weight": c.tensors["q.lora_A.weight"] * 100}
    fixed, n = balance(only_a, rho, 4.0)
    assert n == 1 and float(np.linalg.norm(fixed.tensors["q.lora_A.weight"])) / 2.0 == pytest.approx(4.0)
    assert balance(evil, rho, 0.0) == (evil, 0)  # off


def test_content_digest_ignores_the_seq_and_sees_one_changed_value():
    a, b = make_contribution(0, 4, MODS, seq=1), make_contribution(0, 4, MODS, seq=9)
    assert content_digest(a) == content_digest(b)
    b.tensors["q.lora_A.weight"] = b.tensors["q.lora_A.weight"].copy()
    b.tensors["q.lora_A.weight"][0, 0] += 1e-12
    assert content_digest(a) != content_digest(b)
    c = make_contribution(0, 4, MODS)
    c.tensors = {"renamed": c.tensors["q.lora_A.weight"]}
    d = make_contribution(0, 4, MODS)
    d.tensors = {"other": d.tensors["q.lora_A.weight"]}
    assert content_digest(c) != content_digest(d)  # the name is part of the content


def test_an_old_ledger_gains_the_digest_column(tmp_path: Path):
    Ledger(tmp_path).close()
    with sqlite3.connect(tmp_path / "ledger.sqlite") as db:
        db.execute("DROP INDEX updates_digest")
        db.execute("ALTER TABLE updates DROP COLUMN digest")
    with Ledger(tmp_path) as led:
        c = make_contribution(1, 2, MODS)
        led.accept(c, received_version=0, weight=1.0, digest="abc")
        assert led.seen_content("edge-1", "abc") and not led.seen_content("edge-2", "abc")
        assert not led.seen_content("edge-1", "abd")


def test_rate_limited_log_counts_and_summarises(caplog: pytest.LogCaptureFixture):
    now = [0.0]
    lim = RateLimitedLog(logging.getLogger("t.ratelog"), per_window=3, window_s=60.0, clock=lambda: now[0])
    caplog.set_level("INFO", logger="t.ratelog")
    assert [lim.log("a", "a %d", i) for i in range(5)] == [True, True, True, False, False]
    assert lim.log("b", "b") is True  # per key
    now[0] = 59.9
    assert lim.log("a", "a late") is False and lim.suppressed_total == 3
    now[0] = 60.0
    assert lim.log("a", "a again") is True
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs == ["a 0", "a 1", "a 2", "b", "3 more 'a' lines suppressed in the last 60 s", "a again"]
    silent = RateLimitedLog(logging.getLogger("t.ratelog"), per_window=0)
    assert silent.log("x", "never") is False and silent.suppressed_total == 1
