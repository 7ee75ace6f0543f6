"""Staleness discounts, rejection of stale updates, the FedBuff trigger and server optimizers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_aggregator.errors import FutureBase, StaleUpdate
from cloud_aggregator.server_opt import check_compatible, get_server_optimizer
from cloud_aggregator.staleness import (
    BufferPolicy,
    Constant,
    Hinge,
    Polynomial,
    StalenessPolicy,
    get_discount,
    staleness,
)
from cloud_aggregator.strategies import get_strategy

discounts = st.one_of(
    st.just(Constant()),
    st.builds(Polynomial, a=st.floats(0, 4)),
    st.builds(Hinge, a=st.floats(0, 20), b=st.integers(0, 10)),
)


@settings(max_examples=200, deadline=None)
@given(d=discounts, s=st.integers(0, 10_000), ds=st.integers(0, 100))
def test_discounts_monotone_and_bounded(d, s, ds):
    assert d(0) == 1.0
    assert 0.0 < d(s + ds) <= d(s) <= 1.0


def test_discount_values_and_registry():
    assert Polynomial(a=1)(3) == pytest.approx(0.25)
    assert Hinge(a=2, b=1)(1) == 1.0 and Hinge(a=2, b=1)(3) == pytest.approx(1 / 5)
    assert isinstance(get_discount("hinge", a=1, b=2), Hinge)
    with pytest.raises(ValueError):
        get_discount("exp")
    with pytest.raises(ValueError):
        Polynomial(a=-1)


def test_staleness_policy_rejects_with_typed_reasons():
    p = StalenessPolicy(discount=Polynomial(a=0.5), max_staleness=3)
    assert staleness(10, 7) == 3
    assert p.weight(10, 7) == pytest.approx(0.5)
    with pytest.raises(StaleUpdate) as e:
        p.weight(10, 6)
    assert e.value.reason == "stale"
    with pytest.raises(FutureBase) as f:
        p.weight(3, 4)
    assert f.value.reason == "future_base"
    assert StalenessPolicy(max_staleness=None).weight(10_000, 0) > 0


def test_buffer_policy_count_and_timer():
    b = BufferPolicy(k=3, period_s=10.0)
    b.start(now=100.0)
    assert not b.should_aggregate(105.0)
    assert not b.should_aggregate(111.0)  # timer fired but nothing buffered
    b.arrived()
    assert not b.should_aggregate(105.0)
    assert b.should_aggregate(110.0)
    b.arrived(2)
    assert b.should_aggregate(100.5)
    b.aggregated(now=120.0)
    assert b.pending == 0 and b.next_deadline() == 130.0
    assert not b.should_aggregate(125.0)
    nb = BufferPolicy(k=2)
    nb.start(0.0, pending=5)  # recovered from the ledger after a restart
    assert nb.should_aggregate(0.0)
    with pytest.raises(ValueError):
        BufferPolicy(k=0)


def _t(**kw):
    return {k: np.array(v, dtype=np.float64) for k, v in kw.items()}


def test_server_sgd_replacement_mixing_and_momentum():
    cur, agg = _t(x=[0.0, 0.0]), _t(x=[2.0, 4.0])
    np.testing.assert_allclose(get_server_optimizer("sgd").step(cur, agg)["x"], agg["x"])
    np.testing.assert_allclose(
        get_server_optimizer("sgd", lr=0.5).step(cur, agg)["x"], np.array([1.0, 2.0], dtype=np.float64)
    )
    m = get_server_optimizer("sgd", lr=1.0, momentum=0.5)
    x1 = m.step(cur, agg)
    x2 = m.step(x1, agg)  # zero new delta, momentum keeps moving
    np.testing.assert_allclose(x2["x"], np.array([3.0, 6.0], dtype=np.float64))
    m2 = get_server_optimizer("sgd", lr=1.0, momentum=0.5)
    m2.load_state_dict(m.state_dict())
    np.testing.assert_allclose(m2.step(x2, agg)["x"], m.step(x2, agg)["x"])


def test_fedadam_moves_toward_aggregate_and_pads_rank():
    opt = get_server_optimizer("fedadam", lr=0.1)
    cur = {"m.lora_A.weight": np.zeros((2, 3), np.float32)}
    agg = {"m.lora_A.weight": np.ones((4, 3), np.float32), "new": np.ones((2,), np.float32)}
    out = opt.step(cur, agg)
    assert out["m.lora_A.weight"].shape == (4, 3)
    assert bool((out["m.lora_A.weight"] > 0).all()) and bool((out["m.lora_A.weight"] < 1).all())
    assert np.array_equal(out["new"], agg["new"])
    with pytest.raises(ValueError):
        opt.step({"bias": np.zeros((3,), np.float32)}, {"bias": np.zeros((4,), np.float32)})


def test_server_optimizer_compatibility():
    check_compatible(get_strategy("fedavg").factor_space, get_server_optimizer("fedadam"))
    check_compatible(get_strategy("flora").factor_space, get_server_optimizer("none"))
    with pytest.raises(ValueError):
        check_compatible(get_strategy("flexlora").factor_space, get_server_optimizer("sgd", lr=0.5))
