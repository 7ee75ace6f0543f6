"""The MultimodalDataset container: schema checks, subsets and modality stripping."""

from __future__ import annotations

import numpy as np
import pytest

from megace.datasets import ModalitySpec, MultimodalDataset


def _toy(n: int = 6) -> MultimodalDataset:
    rng = np.random.default_rng(0)
    samples = [
        {
            "modalities": {
                "a": rng.normal(size=(2, 3)).astype(np.float32),
                "b": rng.normal(size=(4, 1)).astype(np.float32),
            },
            "label": i % 3,
            "id": f"s{i}",
            "source": f"s{i}",
        }
        for i in range(n)
    ]
    return MultimodalDataset("toy", {"a": ModalitySpec(3, 2), "b": ModalitySpec(1, 4)}, ["x", "y", "z"], samples)


def test_stack_and_counts() -> None:
    ds = _toy()
    assert ds.stack("a").shape == (6, 2, 3)
    assert ds.stack("b").dtype == np.float32
    assert ds.class_counts().tolist() == [2, 2, 2]
    assert ds.modalities["b"].shape == (4, 1)


def test_with_modalities_strips_samples_and_schema() -> None:
    ds = _toy()
    only_b = ds.with_modalities(["b"])
    assert list(only_b.modalities) == ["b"]
    assert all(set(s["modalities"]) == {"b"} for s in only_b)
    assert set(ds[0]["modalities"]) == {"a", "b"}  # the original is untouched
    only_b.validate()
    with pytest.raises(KeyError):
        ds.with_modalities(["c"])


@pytest.mark.parametrize(
    "breakage",
    [
        lambda s: s["modalities"].__setitem__("a", np.zeros((2, 3), dtype=np.float64)),
        lambda s: s["modalities"].__setitem__("a", np.zeros((3, 3), dtype=np.float32)),
        lambda s: s["modalities"]["a"].__setitem__((0, 0), np.nan),
        lambda s: s.__setitem__("label", 3),
        lambda s: s["modalities"].pop("b"),
    ],
)
def test_validate_rejects_broken_samples(breakage) -> None:
    ds = _toy()
    ds.validate()
    breakage(ds.samples[2])
    with pytest.raises(ValueError):
        ds.validate()
