"""Log-mel / MFCC frames in plain numpy, so a simulated device can compute them without torch or librosa."""

from __future__ import annotations

from functools import lru_cache

import numpy as np


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + f / 700.0)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


@lru_cache(maxsize=8)
def mel_filterbank(rate: int, n_fft: int, n_mels: int, fmin: float = 50.0, fmax: float | None = None) -> np.ndarray:
    """Triangular HTK-style mel filters, ``(n_mels, n_fft // 2 + 1)``."""
    fmax = fmax or rate / 2
    edges = _mel_to_hz(np.linspace(_hz_to_mel(np.array(fmin)), _hz_to_mel(np.array(fmax)), n_mels + 2))
    bins = np.fft.rfftfreq(n_fft, 1.0 / rate)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (bins[None, :] - lo) / (mid - lo)
    down = (hi - bins[None, :]) / (hi - mid)
    return np.maximum(0.0, np.minimum(up, down))


@lru_cache(maxsize=8)
def dct_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Orthonormal DCT-II as a ``(n_out, n_in)`` matrix (what MFCC uses to decorrelate log-mel bands)."""
    k = np.arange(n_out)[:, None]
    n = np.arange(n_in)[None, :]
    m = np.cos(np.pi / n_in * (n + 0.5) * k) * np.sqrt(2.0 / n_in)
    m[0] /= np.sqrt(2.0)
    return m


def trim_silence(x: np.ndarray, rate: int, threshold_db: float = -35.0) -> np.ndarray:
    """Cut leading/trailing 10 ms frames quieter than ``threshold_db`` below the loudest frame."""
    hop = max(1, rate // 100)
    n = len(x) // hop
    if n == 0:
        return x
    rms = np.sqrt((x[: n * hop].reshape(n, hop) ** 2).mean(axis=1) + 1e-12)
    loud = np.flatnonzero(20 * np.log10(rms / rms.max()) > threshold_db)
    return x[loud[0] * hop : (loud[-1] + 1) * hop]


def add_noise(x: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """White Gaussian noise at ``snr_db`` relative to the signal's mean power."""
    power = float((x**2).mean()) + 1e-12
    return x + rng.normal(0.0, np.sqrt(power / 10 ** (snr_db / 10)), size=x.shape).astype(x.dtype)


def log_mel_frames(
    x: np.ndarray, rate: int, *, n_frames: int, n_mels: int = 40, n_fft: int = 512, hop: int = 128
) -> np.ndarray:
    """``(n_frames, n_mels)`` log-mel energies; the STFT is pooled into ``n_frames`` equal time segments.

    Pooling to a fixed frame count (instead of a fixed hop) gives every utterance the same token count
    whatever its duration, which is what a fixed ``ModalitySpec`` needs.
    """
    if len(x) < n_fft:
        x = np.pad(x, (0, n_fft - len(x)))
    n_stft = 1 + (len(x) - n_fft) // hop
    idx = np.arange(n_fft)[None, :] + hop * np.arange(n_stft)[:, None]
    power = np.abs(np.fft.rfft(x[idx] * np.hanning(n_fft), axis=1)) ** 2
    mel = power @ mel_filterbank(rate, n_fft, n_mels).T
    bounds = np.linspace(0, n_stft, n_frames + 1)
    lo = np.minimum(np.floor(bounds[:-1]).astype(int), n_stft - 1)
    hi = np.maximum(np.ceil(bounds[1:]).astype(int), lo + 1)
    pooled = np.stack([mel[a:b].mean(axis=0) for a, b in zip(lo, hi, strict=True)])
    return np.log(pooled + 1e-6)


def mfcc_frames(x: np.ndarray, rate: int, *, n_frames: int = 20, n_coeffs: int = 20, n_mels: int = 40) -> np.ndarray:
    """``(n_frames, n_coeffs)`` MFCCs: DCT of :func:`log_mel_frames`."""
    logmel = log_mel_frames(x, rate, n_frames=n_frames, n_mels=n_mels)
    return (logmel @ dct_matrix(n_mels, n_coeffs).T).astype(np.float32)
