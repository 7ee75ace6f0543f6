"""The compressed body uplink of the fleet benchmark (megace.experiment.body_uplink): exact where the update is
low-rank, Eckart-Young optimal where it is not, nothing lost across rounds (error feedback), bytes by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megace.experiment.body_uplink import BodyCompressor, BodyUplink, low_rank, quantize


def _rank(r: int, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, r, generator=g) @ torch.randn(r, cols, generator=g)


def test_a_low_rank_update_travels_exactly_in_its_factors() -> None:
    delta = _rank(2, 40, 30)
    approx, values = low_rank(delta, 2, bits=32)
    assert values == 4 * 2 * (40 + 30)  # bytes: float32 factors
    assert torch.allclose(approx, delta, atol=1e-4)
    rounded, _ = low_rank(delta, 2, bits=16)  # float16 factors: close, not exact
    err = float((rounded - delta).norm() / delta.norm())
    assert 0 < err < 1e-2


def test_the_approximation_error_is_the_trailing_singular_values() -> None:
    delta = torch.randn(24, 16, generator=torch.Generator().manual_seed(3))
    approx, _ = low_rank(delta, 3, bits=32)
    s = np.linalg.svd(delta.numpy().astype(np.float64), compute_uv=False)
    assert float((delta - approx).norm()) == pytest.approx(float(np.sqrt((s[3:] ** 2).sum())), rel=1e-4)


def test_a_matrix_too_small_to_gain_travels_whole() -> None:
    delta = torch.randn(2, 128)
    approx, values = low_rank(delta, 2, bits=32)
    assert values == 4 * 256 and torch.equal(approx, delta)


def test_error_feedback_carries_what_was_left_out_into_the_next_round() -> None:
    g = torch.Generator().manual_seed(1)
    start = {"w": torch.randn(20, 12, generator=g), "b": torch.randn(12, generator=g)}
    now = {"w": start["w"] + torch.randn(20, 12, generator=g), "b": start["b"] + 1.0}
    comp = BodyCompressor(BodyUplink(rank=1, bits=32))
    comp.start_round(start)
    first, nbytes = comp.compress(now)
    assert nbytes == 4 * (1 * (20 + 12) + 12)
    assert torch.allclose(first["b"], now["b"])  # vectors travel whole
    assert not torch.allclose(first["w"], now["w"], atol=1e-3)  # rank 1 of a full-rank update
    # a round that changes nothing still sends what the last one left out; summed over rounds it converges
    total = first["w"] - start["w"]
    for _ in range(30):
        comp.start_round(start)
        out, _ = comp.compress(start)
        total = total + (out["w"] - start["w"])
    assert torch.allclose(total, now["w"] - start["w"], atol=1e-3)


def test_compress_refuses_tensors_it_has_no_start_for() -> None:
    comp = BodyCompressor(BodyUplink(rank=2))
    with pytest.raises(ValueError):
        comp.compress({"w": torch.zeros(4, 4)})
    with pytest.raises(ValueError):
        BodyUplink(rank=-1)
    with pytest.raises(ValueError):
        BodyUplink(rank=2, bits=12)


def test_int8_keeps_one_scale_per_slice_of_the_shorter_side() -> None:
    """Each row of a wide matrix (each column of a tall one) is rounded to its own max / 127, so a small row
    next to a large one keeps its precision; the bytes are one per number plus two per float16 scale."""
    g = torch.Generator().manual_seed(5)
    wide = torch.randn(3, 40, generator=g)
    wide[0] *= 1000.0
    for x in (wide, wide.T.contiguous()):
        out, nbytes = quantize(x, 8)
        assert nbytes == 120 + 2 * 3
        rows = x if x.shape[0] == 3 else x.T
        got = out if x.shape[0] == 3 else out.T
        for r in range(3):
            step = float(rows[r].abs().max()) / 127
            err = float((got[r] - rows[r]).abs().max())
            assert err <= 0.5 * step * 1.01 + 1e-9  # half a step of its own slice (float16 scale: 1 %)
            assert len(torch.unique(got[r])) > 20  # not flattened by a neighbour's scale
    vec = torch.linspace(-2.0, 1.0, 50)
    out, nbytes = quantize(vec, 8)
    assert nbytes == 50 + 2
    assert float((out - vec).abs().max()) <= 0.5 * 2.0 / 127 * 1.01
    zeros, _ = quantize(torch.zeros(4, 6), 8)
    assert torch.equal(zeros, torch.zeros(4, 6))
    half, nbytes = quantize(vec, 16)
    assert nbytes == 100 and torch.equal(half, vec.half().float())


def test_int8_factors_travel_at_a_byte_a_number() -> None:
    delta = _rank(2, 40, 30)
    approx, nbytes = low_rank(delta, 2, bits=8)
    assert nbytes == 2 * (40 + 30) + 2 * 2 * 2  # two factors, two scales each
    err = float((approx - delta).norm() / delta.norm())
    assert 0 < err < 3e-2
