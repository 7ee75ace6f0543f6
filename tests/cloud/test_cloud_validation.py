"""Every bad update is refused with its typed reason; good ones pass; nothing crashes."""

from __future__ import annotations

import math

import pytest
import torch
from cloud_testkit import make_adapter, make_contribution

from cloud_aggregator import errors
from cloud_aggregator.validation import AdapterSchema, NormGuard, Validator

MODS = {"q": (8, 6), "v": (8, 6)}


def validator(**kw) -> Validator:
    schema = AdapterSchema.from_adapter(make_adapter(4, MODS, 0, extras={"head.bias": (3,)}))
    kw.setdefault("norm_guard", None)
    return Validator(fingerprint="base", schema=schema, max_rank=16, **kw)


def good(**kw):
    kw.setdefault("extras", {"head.bias": (3,)})
    return make_contribution(1, 4, MODS, **kw)


def reject(v: Validator, c, cls):
    with pytest.raises(cls) as e:
        v.validate(c)
    assert e.value.reason == cls.reason
    assert isinstance(e.value, errors.RejectedUpdate)


def test_good_update_passes_and_returns_norm():
    c = good()
    norm = validator().validate(c)
    dense = sum(
        float(torch.linalg.norm(c.scaling * c.tensors[f"{m}.lora_B.weight"] @ c.tensors[f"{m}.lora_A.weight"]) ** 2)
        for m in MODS
    )
    dense += float(c.tensors["head.bias"].pow(2).sum())
    assert norm == pytest.approx(math.sqrt(dense))


def test_other_rank_passes():
    assert validator().validate(make_contribution(2, 9, MODS)) > 0


def test_fingerprint():
    reject(validator(), good(fingerprint="other-model"), errors.FingerprintMismatch)


def test_unknown_tensor_and_module():
    c = good()
    c.tensors["mystery.weight"] = torch.zeros(2)
    reject(validator(), c, errors.UnknownTensor)
    c = good()
    c.tensors["k.lora_A.weight"] = torch.zeros(4, 6, dtype=torch.float64)
    c.tensors["k.lora_B.weight"] = torch.zeros(8, 4, dtype=torch.float64)
    reject(validator(), c, errors.UnknownTensor)


def test_shape_mismatches():
    c = good()
    c.tensors["q.lora_A.weight"] = torch.zeros(4, 7, dtype=torch.float64)
    reject(validator(), c, errors.ShapeMismatch)
    c = good()
    c.tensors["head.bias"] = torch.zeros(4, dtype=torch.float64)
    reject(validator(), c, errors.ShapeMismatch)
    c = good()
    del c.tensors["v.lora_A.weight"]
    reject(validator(), c, errors.ShapeMismatch)
    c = good()
    c.tensors["q.lora_A.weight"] = torch.zeros(4, 6, dtype=torch.int64)
    reject(validator(), c, errors.ShapeMismatch)
    c = good()
    del c.tensors["v.lora_B.weight"]  # A alone: only fine for FedSA
    reject(validator(), c, errors.ShapeMismatch)
    assert validator(require_b=False).validate(c) > 0


def test_rank_mismatches():
    c = good()
    c.rank = 5  # declared rank disagrees with the factors
    reject(validator(), c, errors.RankMismatch)
    reject(validator(), make_contribution(1, 32, MODS), errors.RankMismatch)  # above max_rank


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite(bad):
    c = good()
    c.tensors["v.lora_B.weight"][0, 0] = bad
    reject(validator(), c, errors.NonFinite)


def test_overflowing_norm_is_non_finite():
    c = good()
    c.tensors["q.lora_B.weight"] = torch.full((8, 4), 1e300, dtype=torch.float64)
    reject(validator(), c, errors.NonFinite)


def test_duplicate_and_replay():
    accepted = {("edge-1", 1), ("edge-1", 2)}
    v = validator(
        seen=lambda e, s: (e, s) in accepted, last_seq=lambda e: max((s for x, s in accepted if x == e), default=None)
    )
    reject(v, good(seq=2), errors.DuplicateUpdate)
    reject(v, good(seq=0), errors.ReplayedUpdate)
    assert v.validate(good(seq=3)) > 0


@pytest.mark.parametrize(
    "field,value", [("samples", -1), ("alpha", 0.0), ("alpha", float("nan")), ("rank", 0), ("edge_id", "")]
)
def test_bad_metadata(field, value):
    c = good()
    setattr(c, field, value)
    reject(validator(), c, errors.BadMetadata)


def test_garbage_object_becomes_a_reason_not_a_crash():
    c = good()
    c.tensors = {"q.lora_A.weight": "not a tensor"}  # type: ignore[dict-item]
    with pytest.raises(errors.RejectedUpdate):
        validator().validate(c)


def test_norm_guard_rejects_outliers_after_history():
    guard = NormGuard(z_max=4.0, ratio_max=50.0, min_history=5)
    v = validator(norm_guard=guard)
    huge = good(seed=5)
    huge.tensors["q.lora_B.weight"] *= 1e4
    assert v.validate(huge) > 0  # no history yet: not judged
    for i in range(8):
        v.accepted(v.validate(make_contribution(10 + i, 4, MODS, extras={"head.bias": (3,)})))
    reject(v, huge, errors.NormOutlier)
    tiny = good(seed=6)
    for k in tiny.tensors:
        tiny.tensors[k] = tiny.tensors[k] * 1e-4
    reject(v, tiny, errors.NormOutlier)
    assert v.validate(good(seed=7)) > 0  # an ordinary one still passes
    z_only = NormGuard(z_max=3.0, ratio_max=None, min_history=3, min_spread=0.05)
    for n in (1.0, 1.1, 0.9, 1.05):
        z_only.observe(n)
    with pytest.raises(errors.NormOutlier):
        z_only.check(3.0)
    z_only.check(1.02)


def test_norm_guard_spread_floor_tolerates_honest_heterogeneity():
    """Near-identical history has a tiny MAD; the floor keeps a 3x (rank 2 vs rank 16) norm acceptable."""
    guard = NormGuard(z_max=6.0, ratio_max=None, min_history=3)
    for n in (1.0, 1.001, 0.999, 1.0005):
        guard.observe(n)
    guard.check(3.0)
    guard.check(1 / 3.0)
    with pytest.raises(errors.NormOutlier):
        guard.check(1e3)
    strict = NormGuard(z_max=6.0, ratio_max=None, min_history=3, min_spread=0.0)
    for n in (1.0, 1.001, 0.999, 1.0005):
        strict.observe(n)
    with pytest.raises(errors.NormOutlier):
        strict.check(3.0)


def test_reasons_are_unique():
    assert len(set(errors.REASONS)) == len(errors.REASONS)
