"""``basicmotions``: real smartwatch recordings (sktime's bundled BasicMotions, UEA archive).

80 recordings x 6 channels x 100 steps at 10 Hz (accelerometer x/y/z, gyroscope x/y/z) of 4 activities.
Each modality becomes 10 tokens of 10 steps x 3 channels (token_dim 30), standardized per channel with
statistics of the *train* recordings only. The official 40/40 train/test split is kept, since the
recordings are few and the split is what the literature reports on.
"""

from __future__ import annotations

import numpy as np

from megace.datasets.dataset import ModalitySpec, MultimodalDataset, Sample
from megace.datasets.tokens import resample_series, series_tokens

NAME = "basicmotions"
CLASSES = ["badminton", "running", "standing", "walking"]
MODALITY_CHANNELS = {"accel": slice(0, 3), "gyro": slice(3, 6)}
STEPS = 100
N_TOKENS = 10


def _load_raw(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The bundled ``.ts`` file as ``(n, 6, 100)`` float64 and integer labels; sktime is imported lazily."""
    from sktime.datasets import load_basic_motions

    x, y = load_basic_motions(split=split, return_type="numpy3D")
    labels = np.array([CLASSES.index(str(v)) for v in y], dtype=np.int64)
    return np.asarray(x, dtype=np.float64), labels


def augment_recordings(
    x: np.ndarray,
    per_recording: int,
    rng: np.random.Generator,
    *,
    min_crop: int = 60,
    noise: float = 0.05,
    scale: float = 0.1,
) -> tuple[np.ndarray, np.ndarray]:
    """Make ``per_recording`` jittered views of each *normalized* ``(n, ch, steps)`` recording.

    A view is a random contiguous crop of ``min_crop..steps`` steps resampled back to ``steps`` (a slightly
    faster or slower, shifted replay of the same motion), times a per-channel gain ``1 +- scale`` and plus
    Gaussian noise of std ``noise``. Returns the views and, for each, the index of its recording. Pass only
    train recordings: a view is a near-copy of its recording.
    """
    n, channels, steps = x.shape
    views = np.empty((n * per_recording, channels, steps))
    origin = np.repeat(np.arange(n), per_recording)
    for k, i in enumerate(origin):
        length = int(rng.integers(min_crop, steps + 1))
        start = int(rng.integers(0, steps - length + 1))
        view = resample_series(x[i, :, start : start + length], steps)
        view *= 1.0 + rng.uniform(-scale, scale, size=(channels, 1))
        views[k] = view + rng.normal(0.0, noise, size=view.shape)
    return views, origin


def _to_samples(x: np.ndarray, labels: np.ndarray, ids: list[str], sources: list[str]) -> list[Sample]:
    return [
        {
            "modalities": {m: series_tokens(rec[ch], N_TOKENS) for m, ch in MODALITY_CHANNELS.items()},
            "label": int(label),
            "id": sid,
            "source": src,
        }
        for rec, label, sid, src in zip(x, labels, ids, sources, strict=True)
    ]


def load_basicmotions(*, seed: int = 0, augment: int = 0, **augment_kwargs: float) -> tuple[
    MultimodalDataset, MultimodalDataset
]:
    """Official train (40) / test (40) split; ``augment=k`` adds ``k`` views of every *train* recording.

    ``augment_kwargs`` go to :func:`augment_recordings` (``min_crop``, ``noise``, ``scale``).
    """
    x_train, y_train = _load_raw("train")
    x_test, y_test = _load_raw("test")
    mean = x_train.mean(axis=(0, 2), keepdims=True)
    std = x_train.std(axis=(0, 2), keepdims=True) + 1e-8
    x_train = (x_train - mean) / std
    x_test = (x_test - mean) / std

    train_src = [f"{NAME}:train:{i}" for i in range(len(x_train))]
    test_src = [f"{NAME}:test:{i}" for i in range(len(x_test))]
    train_samples = _to_samples(x_train, y_train, train_src, train_src)
    if augment > 0:
        views, origin = augment_recordings(x_train, augment, np.random.default_rng(seed), **augment_kwargs)
        view_ids = [f"{train_src[i]}#aug{k}" for k, i in enumerate(origin)]
        train_samples += _to_samples(views, y_train[origin], view_ids, [train_src[i] for i in origin])

    modalities = {m: ModalitySpec(token_dim=3 * STEPS // N_TOKENS, tokens=N_TOKENS) for m in MODALITY_CHANNELS}
    info = {
        "source": "sktime bundled BasicMotions (UEA archive)",
        "real": True,
        "augment": augment,
        "norm_mean": mean.ravel().tolist(),
        "norm_std": std.ravel().tolist(),
    }
    train = MultimodalDataset(NAME, modalities, list(CLASSES), train_samples, info)
    test = MultimodalDataset(NAME, dict(modalities), list(CLASSES), _to_samples(x_test, y_test, test_src, test_src),
                             dict(info))
    return train, test
