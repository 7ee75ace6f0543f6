"""How long a device takes to turn one raw capture into the feature record it sends (numpy, no torch).

This is the "feature generation" line of the latency breakdown. It times the same functions the
datasets use to build their features, on inputs of the real shape: for ``basicmotions`` a 10 s,
6-channel window normalized and cut into tokens; for ``digits-av`` an 8x8 image cut into patches plus
one spoken word (a real espeak-ng WAV from the dataset cache) trimmed and turned into 20x20 MFCCs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from megace.loop.results import percentile


def _time(fn: Callable[[], object], reps: int) -> list[float]:
    fn()  # warm caches (mel filterbank, DCT matrix)
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def basicmotions_sample() -> Callable[[], object]:
    from megace.datasets.basicmotions import MODALITY_CHANNELS, N_TOKENS
    from megace.datasets.tokens import series_tokens

    rng = np.random.default_rng(0)
    raw = rng.normal(size=(6, 100))
    mean, std = raw.mean(axis=1, keepdims=True), raw.std(axis=1, keepdims=True)

    def make() -> object:
        x = (raw - mean) / std
        return {m: series_tokens(x[ch], N_TOKENS) for m, ch in MODALITY_CHANNELS.items()}

    return make


def _a_wav() -> tuple[np.ndarray, int]:
    from megace.datasets.cache import cache_dir
    from megace.datasets.digits_av import voices
    from megace.datasets.speech import read_wav, synthesize

    root = cache_dir("digits-av") / "wav"
    found = sorted(root.glob("*.wav")) if root.exists() else []
    path = found[0] if found else synthesize("seven", voices(1)[0], Path(root) / "seven_probe.wav")
    return read_wav(path)


def digits_av_sample() -> Callable[[], object]:
    from megace.datasets.audio_features import mfcc_frames, trim_silence
    from megace.datasets.digits_av import N_COEFFS, N_FRAMES
    from megace.datasets.tokens import image_patches

    img = np.random.default_rng(0).uniform(-1, 1, size=(8, 8))
    wav, rate = _a_wav()

    def make() -> object:
        return {"image": image_patches(img, 4),
                "audio": mfcc_frames(trim_silence(wav, rate), rate, n_frames=N_FRAMES, n_coeffs=N_COEFFS)}

    return make


SAMPLERS = {"basicmotions": basicmotions_sample, "digits-av": digits_av_sample}


def feature_generation_ms(task: str, reps: int = 200) -> tuple[float, float]:
    """(p50, p95) milliseconds to produce one sample's features for ``task``."""
    xs = [1000 * t for t in _time(SAMPLERS[task](), reps)]
    return percentile(xs, 0.5), percentile(xs, 0.95)
