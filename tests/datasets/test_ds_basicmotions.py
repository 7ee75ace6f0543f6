"""basicmotions: real smartwatch recordings, shapes, determinism, and leak-free augmentation."""

from __future__ import annotations

import numpy as np
import pytest

from megace.datasets import MultimodalDataset, load_dataset
from megace.datasets import basicmotions as bm


def test_shapes_dtypes_and_classes(basicmotions: tuple[MultimodalDataset, MultimodalDataset]) -> None:
    train, test = basicmotions
    for ds in (train, test):
        ds.validate()
        assert {m: s.shape for m, s in ds.modalities.items()} == {"accel": (10, 30), "gyro": (10, 30)}
        assert (ds.class_counts() > 0).all() and len(ds.classes) == 4
    assert len(test) == 40
    assert len(train) == 40 * (1 + 3)
    # Normalized with train statistics: the real train recordings have ~zero mean / unit std per channel.
    real = train.subset([i for i, s in enumerate(train) if "#" not in s["id"]])
    accel = real.stack("accel").reshape(len(real), 10, 10, 3)
    assert np.allclose(accel.mean(axis=(0, 1, 2)), 0, atol=1e-4)
    assert np.allclose(accel.std(axis=(0, 1, 2)), 1, atol=1e-3)


def test_tokens_are_consecutive_time_windows() -> None:
    x = np.arange(2 * 20, dtype=float).reshape(2, 20)  # 2 channels x 20 steps
    tokens = bm.series_tokens(x, 4)
    assert tokens.shape == (4, 10)
    assert tokens[1].tolist() == [5, 25, 6, 26, 7, 27, 8, 28, 9, 29]


def test_determinism_by_seed() -> None:
    a, _ = load_dataset("basicmotions", seed=5, augment=2)
    b, _ = load_dataset("basicmotions", seed=5, augment=2)
    c, _ = load_dataset("basicmotions", seed=6, augment=2)
    assert np.array_equal(a.stack("gyro"), b.stack("gyro"))
    assert not np.array_equal(a.stack("gyro"), c.stack("gyro"))
    assert np.array_equal(a.stack("gyro")[:40], c.stack("gyro")[:40])  # the real recordings do not depend on seed


def test_augmentation_sees_only_train_recordings(monkeypatch: pytest.MonkeyPatch) -> None:
    x_test, _ = bm._load_raw("test")
    seen: list[np.ndarray] = []
    real_augment = bm.augment_recordings

    def spy(x: np.ndarray, *args, **kwargs):
        seen.append(x.copy())
        return real_augment(x, *args, **kwargs)

    monkeypatch.setattr(bm, "augment_recordings", spy)
    train, test = bm.load_basicmotions(seed=0, augment=4)
    assert len(seen) == 1 and seen[0].shape == (40, 6, 100)
    mean, std = np.array(train.info["norm_mean"]), np.array(train.info["norm_std"])
    test_norm = (x_test - mean[None, :, None]) / std[None, :, None]
    for rec in test_norm:  # no test recording was handed to the augmenter
        assert not np.isclose(seen[0], rec).all(axis=(1, 2)).any()
    test_sources = {s["source"] for s in test}
    augmented = [s for s in train if "#aug" in s["id"]]
    assert len(augmented) == 160
    assert all(s["source"].startswith("basicmotions:train:") for s in augmented)
    assert not {s["source"] for s in augmented} & test_sources


def test_augmented_views_resemble_their_own_recording() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 3, 100)).cumsum(axis=2)  # smooth, distinct random walks
    views, origin = bm.augment_recordings(x, 4, rng)
    assert views.shape == (20, 3, 100) and origin.tolist() == np.repeat(np.arange(5), 4).tolist()
    for v, o in zip(views, origin, strict=True):
        dist = np.abs(x - v).mean(axis=(1, 2))
        assert dist.argmin() == o
