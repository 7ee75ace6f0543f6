"""Each task is learnable from each modality alone: a plain scikit-learn baseline beats chance by far."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from megace.datasets import MultimodalDataset


def _series_summary(ds: MultimodalDataset, modality: str) -> np.ndarray:
    """Per-channel mean, std and mean |step| of a (10 x 10 steps x 3 ch) series: phase-invariant features."""
    x = ds.stack(modality).reshape(len(ds), -1, 3)
    return np.concatenate([x.mean(1), x.std(1), np.abs(np.diff(x, axis=1)).mean(1)], axis=1)


def _flat(ds: MultimodalDataset, modality: str) -> np.ndarray:
    return ds.stack(modality).reshape(len(ds), -1)


def _accuracy(train: np.ndarray, y_train: np.ndarray, test: np.ndarray, y_test: np.ndarray) -> float:
    clf = LogisticRegression(max_iter=2000).fit(train, y_train)
    return float(clf.score(test, y_test))


@pytest.mark.parametrize("modality", ["accel", "gyro"])
def test_basicmotions_is_learnable(basicmotions, modality: str) -> None:
    train, test = basicmotions
    acc = _accuracy(_series_summary(train, modality), train.labels, _series_summary(test, modality), test.labels)
    assert acc >= 0.8  # chance is 0.25
    flat = _accuracy(_flat(train, modality), train.labels, _flat(test, modality), test.labels)
    assert flat >= 0.4  # even raw flattened windows carry signal


@pytest.mark.parametrize(("modality", "floor"), [("image", 0.85), ("audio", 0.6)])
def test_digits_av_is_learnable_on_unseen_voices(digits_av, modality: str, floor: float) -> None:
    train, test = digits_av
    acc = _accuracy(_flat(train, modality), train.labels, _flat(test, modality), test.labels)
    assert acc >= floor  # chance is 0.1


def test_labels_are_not_shuffled_noise(digits_av) -> None:
    """Sanity of the sanity check: with permuted train labels the baseline falls to about chance."""
    train, test = digits_av
    y = np.random.default_rng(0).permutation(train.labels)
    assert _accuracy(_flat(train, "image"), y, _flat(test, "image"), test.labels) < 0.3
