"""Turning raw signals into the ``(tokens, token_dim)`` float32 arrays devices publish (numpy only)."""

from __future__ import annotations

import numpy as np


def series_tokens(x: np.ndarray, n_tokens: int) -> np.ndarray:
    """Cut a ``(channels, steps)`` series into ``n_tokens`` consecutive windows, each flattened step-major.

    Token ``t`` is ``x[:, t*w:(t+1)*w].T.ravel()`` with ``w = steps // n_tokens`` — i.e. ``w`` rows of all
    channels — so a token is a short multichannel snippet, like a patch of an image.
    """
    channels, steps = x.shape
    if steps % n_tokens:
        raise ValueError(f"{steps} steps do not split into {n_tokens} tokens")
    w = steps // n_tokens
    return np.ascontiguousarray(x.T.reshape(n_tokens, w * channels), dtype=np.float32)


def resample_series(x: np.ndarray, steps: int) -> np.ndarray:
    """Linearly resample a ``(channels, n)`` series to ``(channels, steps)``."""
    n = x.shape[1]
    src = np.linspace(0.0, 1.0, n)
    dst = np.linspace(0.0, 1.0, steps)
    return np.stack([np.interp(dst, src, ch) for ch in x])


def image_patches(img: np.ndarray, patch: int) -> np.ndarray:
    """Cut an ``(h, w)`` image into non-overlapping ``patch x patch`` patches in raster order, flattened."""
    h, w = img.shape
    if h % patch or w % patch:
        raise ValueError(f"image {h}x{w} does not split into {patch}x{patch} patches")
    p = img.reshape(h // patch, patch, w // patch, patch).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(p.reshape(-1, patch * patch), dtype=np.float32)
