"""The compressed body uplink of the fleet benchmark (megace.experiment.body_uplink): exact where the update is
low-rank, Eckart-Young optimal where it is not, nothing lost across rounds (error feedback), bytes by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megace.experiment.body_uplink import BodyCompressor, BodyUplink, low_rank


def _rank(r: int, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, r, generator=g) @ torch.randn(r, cols, generator=g)


def test_a_low_rank_update_travels_exactly_in_its_factors() -> None:
    delta = _rank(2, 40, 30)
    approx, values = low_rank(delta, 2, fp16=False)
    assert values == 2 * (40 + 30)
    assert torch.allclose(approx, delta, atol=1e-4)
    rounded, _ = low_rank(delta, 2, fp16=True)  # float16 factors: close, not exact
    err = float((rounded - delta).norm() / delta.norm())
    assert 0 < err < 1e-2


def test_the_approximation_error_is_the_trailing_singular_values() -> None:
    delta = torch.randn(24, 16, generator=torch.Generator().manual_seed(3))
    approx, _ = low_rank(delta, 3, fp16=False)
    s = np.linalg.svd(delta.numpy().astype(np.float64), compute_uv=False)
    assert float((delta - approx).norm()) == pytest.approx(float(np.sqrt((s[3:] ** 2).sum())), rel=1e-4)


def test_a_matrix_too_small_to_gain_travels_whole() -> None:
    delta = torch.randn(2, 128)
    approx, values = low_rank(delta, 2, fp16=False)
    assert values == 256 and torch.equal(approx, delta)


def test_error_feedback_carries_what_was_left_out_into_the_next_round() -> None:
    g = torch.Generator().manual_seed(1)
    start = {"w": torch.randn(20, 12, generator=g), "b": torch.randn(12, generator=g)}
    now = {"w": start["w"] + torch.randn(20, 12, generator=g), "b": start["b"] + 1.0}
    comp = BodyCompressor(BodyUplink(rank=1, fp16=False))
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
