"""Every bad update is refused with its typed reason; good ones pass; nothing crashes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cloud_aggregator import errors
from cloud_aggregator.validation import AdapterSchema, NormGuard, Validator
from tests.support.cloud_testkit import make_adapter, make_contribution

MODS = {"q": (8, 6), "v": (8, 6)}


def validator(**kw) -> Validator:
    schema = AdapterSchema.from_adapter(make_adapter(4, MODS, 0, extras={"head.bias": (3,)}))
    kw.setdefault("norm_guard", None)
    kw.setdefault("max_rank", 16)
    return Validator(fingerprint="base", schema=schema, **kw)


def good(**kw):
    kw.setdefault("extras", {"head.bias": (3,)})
    return make_contribution(1, 4, MODS, **kw)


def reject(v: Validator, c, cls, match: str | None = None):
    with pytest.raises(cls, match=match) as e:
        v.validate(c)
    assert e.value.reason == cls.reason
    assert isinstance(e.value, errors.RejectedUpdate)


def test_good_update_passes_and_returns_norm():
    c = good()
    norm = validator().validate(c)
    dense = sum(
        float(np.linalg.norm(c.scaling * c.tensors[f"{m}.lora_B.weight"] @ c.tensors[f"{m}.lora_A.weight"]) ** 2)
        for m in MODS
    )
    dense += float((c.tensors["head.bias"] ** 2).sum())
    assert norm == pytest.approx(math.sqrt(dense))


def test_other_rank_passes():
    assert validator().validate(make_contribution(2, 9, MODS)) > 0


def test_fingerprint():
    reject(validator(), good(fingerprint="other-model"), errors.FingerprintMismatch,
           r"^base_fingerprint: 'other-model' != 'base'$")


def test_unknown_tensor_and_module():
    c = good()
    c.tensors["mystery.weight"] = np.zeros(2, dtype=np.float32)
    reject(validator(), c, errors.UnknownTensor, r"^unknown_tensor: mystery\.weight$")
    c = good()
    c.tensors["k.lora_A.weight"] = np.zeros((4, 6), dtype=np.float64)
    c.tensors["k.lora_B.weight"] = np.zeros((8, 4), dtype=np.float64)
    reject(validator(), c, errors.UnknownTensor, r"^unknown_tensor: k$")


def test_shape_mismatches():
    c = good()
    c.tensors["q.lora_A.weight"] = np.zeros((4, 7), dtype=np.float64)
    reject(validator(), c, errors.ShapeMismatch, r"^shape: q\.lora_A\.weight in=7 expected 6$")
    c = good()
    c.tensors["head.bias"] = np.zeros(4, dtype=np.float64)
    reject(validator(), c, errors.ShapeMismatch, r"^shape: head\.bias \(4,\) expected \(3,\)$")
    c = good()
    del c.tensors["v.lora_A.weight"]
    reject(validator(), c, errors.ShapeMismatch, r"^shape: v: unpaired LoRA factor$")
    c = good()
    c.tensors["q.lora_A.weight"] = np.zeros((4, 6), dtype=np.int64)
    reject(validator(), c, errors.ShapeMismatch, r"^shape: q\.lora_A\.weight: not a floating-point tensor$")
    c = good()
    del c.tensors["v.lora_B.weight"]  # A alone: only fine for FedSA
    reject(validator(), c, errors.ShapeMismatch)
    assert validator(require_b=False).validate(c) > 0


def test_rank_mismatches():
    c = good()
    c.rank = 5  # declared rank disagrees with the factors
    reject(validator(), c, errors.RankMismatch, r"^rank: q\.lora_A\.weight shape \(4, 6\) vs declared rank 5$")
    reject(validator(), make_contribution(1, 32, MODS), errors.RankMismatch, r"^rank: rank 32 > max 16$")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite(bad):
    c = good()
    c.tensors["v.lora_B.weight"][0, 0] = bad
    reject(validator(), c, errors.NonFinite, r"^non_finite: v\.lora_B\.weight$")


def test_overflowing_norm_is_non_finite():
    c = good()
    c.tensors["q.lora_B.weight"] = np.full((8, 4), 1e300, dtype=np.float64)
    reject(validator(), c, errors.NonFinite, r"^non_finite: effective norm overflows$")


def test_duplicate_and_replay():
    accepted = {("edge-1", 1), ("edge-1", 2)}
    v = validator(
        seen=lambda e, s: (e, s) in accepted, last_seq=lambda e: max((s for x, s in accepted if x == e), default=None)
    )
    reject(v, good(seq=2), errors.DuplicateUpdate, r"^duplicate: edge-1#2$")
    reject(v, good(seq=0), errors.ReplayedUpdate, r"^replayed: edge-1#0 <= last accepted 2$")
    assert v.validate(good(seq=3)) > 0
    only_last = validator(last_seq=lambda e: 2)  # the replay bound alone: the last seq itself is a replay too
    reject(only_last, good(seq=2), errors.ReplayedUpdate, r"^replayed: edge-1#2 <= last accepted 2$")


METADATA = r"^bad_metadata: seq/base_version/samples must be >= 0 and rank >= 1$"
ALPHA = r"^bad_metadata: alpha must be finite and > 0$"


@pytest.mark.parametrize(
    "field,value,match",
    [("samples", -1, METADATA), ("alpha", 0.0, ALPHA), ("alpha", float("nan"), ALPHA), ("rank", 0, METADATA),
     ("edge_id", "", r"^bad_metadata: empty edge_id$")],
)
def test_bad_metadata(field, value, match):
    """The detail is what the ledger's audit trail records for the refusal."""
    c = good()
    setattr(c, field, value)
    reject(validator(), c, errors.BadMetadata, match)


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


# ---- boundaries of every check (each one fails if its comparison or field is changed) -----------------


@pytest.mark.parametrize(
    "field,value,match",
    [("seq", -1, METADATA), ("base_version", -1, METADATA), ("alpha", -2.0, ALPHA), ("alpha", float("inf"), ALPHA),
     ("edge_id", 7, "empty edge_id"), ("modalities", {"audio": -1}, r"^bad_metadata: negative modality count$")],
)
def test_more_bad_metadata(field, value, match):
    c = good()
    setattr(c, field, value)
    reject(validator(), c, errors.BadMetadata, match)


def test_zero_is_a_valid_seq_base_and_sample_count():
    c = good(seq=0, base_version=0, samples=0, modalities={"audio": 0})
    assert validator().validate(c) > 0
    assert validator(max_rank=4).validate(c) > 0  # rank == max_rank is allowed
    assert validator().validate(make_contribution(2, 1, MODS, alpha=1e-9)) > 0  # rank 1, any alpha > 0


def test_factor_rank_and_dimension_checks():
    c = good()
    c.tensors["q.lora_B.weight"] = np.zeros((8, 3), dtype=np.float64)  # B's rank axis disagrees
    reject(validator(), c, errors.RankMismatch, r"^rank: q\.lora_B\.weight shape \(8, 3\) vs declared rank 4$")
    c = good()
    c.tensors["q.lora_A.weight"] = np.zeros((4, 6, 1), dtype=np.float64)  # not a matrix
    reject(validator(), c, errors.RankMismatch, r"^rank: q\.lora_A\.weight shape \(4, 6, 1\) vs declared rank 4$")
    c = good()
    c.tensors["q.lora_B.weight"] = np.zeros((8, 4, 1), dtype=np.float64)
    reject(validator(), c, errors.RankMismatch)
    c = good()
    c.tensors["q.lora_B.weight"] = np.zeros((9, 4), dtype=np.float64)  # wrong out dimension
    reject(validator(), c, errors.ShapeMismatch, r"^shape: q\.lora_B\.weight out=9 expected 8$")
    c = good()
    del c.tensors["q.lora_A.weight"]  # B alone is never meaningful, not even for FedSA
    reject(validator(require_b=False), c, errors.ShapeMismatch, r"^shape: q: unpaired LoRA factor$")
    c = good()
    c.tensors = {}
    reject(validator(), c, errors.ShapeMismatch, r"^shape: no tensors$")


def test_without_schema_or_fingerprint_only_the_generic_checks_apply():
    v = Validator(norm_guard=None)
    c = make_contribution(3, 2, {"anything": (3, 5)}, extras={"free.bias": (7,)}, fingerprint="whatever")
    assert v.validate(c) > 0
    v.accepted(1.0)  # no guard: nothing to feed, no error


def test_schema_is_derived_from_a_reference_adapter():
    schema = AdapterSchema.from_adapter(make_adapter(3, {"q": (8, 6)}, 0, extras={"head.bias": (3,)}))
    assert schema.modules == {"q": (8, 6)} and schema.extras == {"head.bias": (3,)}
    lone = make_adapter(3, {"q": (8, 6)}, 0)
    del lone["q.lora_B.weight"]
    with pytest.raises(ValueError, match="unpaired module q"):
        AdapterSchema.from_adapter(lone)


def test_a_malformed_object_becomes_bad_metadata_naming_the_error():
    c = good()
    c.tensors = {"q.lora_A.weight": "not a tensor", "q.lora_B.weight": "nor this"}  # type: ignore[dict-item]
    with pytest.raises(errors.BadMetadata, match="AttributeError"):
        validator().validate(c)


def _robust_z(history: list[float], norm: float, min_spread: float) -> float:
    """The documented log-norm robust z: |log n - median| / max(1.4826 MAD, min_spread, 1e-3)."""
    logs = np.log(np.asarray([h for h in history if h > 0]))
    med = float(np.median(logs))
    mad = 1.4826 * float(np.median(np.abs(logs - med)))
    return abs(math.log(norm) - med) / max(mad, min_spread, 1e-3)


@pytest.mark.parametrize("scale", [1.0, 1e-3], ids=["norms-above-1", "norms-below-1"])
@pytest.mark.parametrize("min_spread", [0.0, 0.1, 2.0])
def test_norm_guard_z_bound_is_the_documented_robust_z(min_spread, scale):
    history = [scale * h for h in (1.0, 2.0, 4.0, 8.0, 16.0, 3.0)]
    guard = NormGuard(z_max=2.0, ratio_max=None, min_history=6, min_spread=min_spread)
    for h in history:
        guard.observe(h)
    for norm in scale * np.geomspace(0.05, 500.0, 61):
        z = _robust_z(history, float(norm), min_spread)
        if abs(z - 2.0) < 1e-6:
            continue  # too close to the bound to call
        if z > 2.0:
            with pytest.raises(errors.NormOutlier, match="robust z"):
                guard.check(float(norm))
        else:
            guard.check(float(norm))


def test_norm_guard_ratio_bound_is_inclusive_and_two_sided():
    guard = NormGuard(z_max=None, ratio_max=10.0, min_history=5)
    for h in (1.0, 1.0, 2.0, 0.5, 1.0):  # median 1
        guard.observe(h)
    guard.check(10.0)
    guard.check(0.1)
    for bad, shown in ((10.01, "10"), (0.0999, "0.0999")):
        with pytest.raises(errors.NormOutlier, match=rf"^norm_outlier: norm {shown} vs median 1 \(ratio bound 10.0\)$"):
            guard.check(bad)


def test_norm_guard_history_window_and_warm_up():
    guard = NormGuard(z_max=1.0, ratio_max=2.0, min_history=3, window=3)
    for h in (100.0, 200.0, 1.0, 1.0):
        guard.observe(h)
    assert list(guard.history) == [200.0, 1.0, 1.0]  # only the last `window` norms are kept
    guard.observe(1.0)
    with pytest.raises(errors.NormOutlier):
        guard.check(100.0)  # judged against [1, 1, 1] only
    fresh = NormGuard(z_max=1.0, ratio_max=2.0, min_history=3)
    fresh.observe(1.0)
    fresh.observe(1.0)
    fresh.check(1e6)  # fewer than min_history norms: not judged


def test_norm_guard_ignores_zero_norms_in_the_log_test():
    guard = NormGuard(z_max=1.0, ratio_max=None, min_history=3)
    for h in (0.0, 0.0, 0.0, 1.0, 1.0):  # only two positive norms: too few for the log test
        guard.observe(h)
    guard.check(1e6)
    guard.check(0.0)  # a zero norm is not a log-space outlier (and must not crash)
    zero_median = NormGuard(z_max=1.0, ratio_max=None, min_history=3)
    for h in (0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0):  # median 0: no scale to judge by
        zero_median.observe(h)
    zero_median.check(1e6)
    positive = NormGuard(z_max=1.0, ratio_max=None, min_history=3)
    for h in (1.0, 2.0, 3.0):
        positive.observe(h)
    positive.check(0.0)  # an all-zero update has no log-norm: the z test does not apply
    ratio = NormGuard(z_max=None, ratio_max=2.0, min_history=3)
    for _ in range(3):
        ratio.observe(0.0)
    ratio.check(5.0)  # a zero median gives no ratio bound


def test_norm_guard_z_test_edges():
    """The bound itself passes, a zero MAD falls back to the 1e-3 floor, zero norms stay out of the log."""
    at_bound = NormGuard(z_max=2.0, ratio_max=None, min_history=3, min_spread=0.5)
    for _ in range(3):
        at_bound.observe(1.0)
    at_bound.check(math.e)  # z = |log e - 0| / 0.5 = 2: not above the bound
    with pytest.raises(errors.NormOutlier, match=r"^norm_outlier: log-norm robust z 2\.0 > 2\.0$"):
        at_bound.check(math.e * 1.001)
    no_floor = NormGuard(z_max=6.0, ratio_max=None, min_history=3, min_spread=0.0)
    for _ in range(3):
        no_floor.observe(1.0)
    no_floor.check(1.005)  # z = log(1.005) / 1e-3 ≈ 5
    with pytest.raises(errors.NormOutlier):
        no_floor.check(1.01)  # ≈ 10
    with_zeros = NormGuard(z_max=6.0, ratio_max=None, min_history=3)
    for h in (0.0, 1.0, 1.0, 1.0, 2.0):  # median 1; the zero has no logarithm and is left out
        with_zeros.observe(h)
    with_zeros.check(1.5)
