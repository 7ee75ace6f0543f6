"""``digits-av``: audio-visual digits — real handwritten digit images paired with synthesized speech.

* ``image``: scikit-learn's bundled 8x8 digits (1,797 real scans, UCI), as 4 tokens of 4x4 patches
  (token_dim 16), scaled from 0..16 to -1..1.
* ``audio``: the digit's English word spoken by ``espeak-ng`` in ``n_voices`` fixed voices (accent, variant,
  speed, pitch), each rendered ``renditions`` times with random silence padding and white noise
  (10-30 dB SNR), as 20 frames x 20 MFCCs standardized with train-voice statistics.

Images are paired with a random utterance of the same digit. Voices are split between train and test,
so test audio always comes from speakers never heard in training. WAVs and MFCCs are cached under
:func:`megace.datasets.cache.cache_dir` and built once (a few seconds).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from megace.datasets.audio_features import add_noise, mfcc_frames, trim_silence
from megace.datasets.cache import cache_dir
from megace.datasets.dataset import ModalitySpec, MultimodalDataset, Sample
from megace.datasets.speech import Voice, espeak_path, read_wav, synthesize
from megace.datasets.splits import train_test_split
from megace.datasets.tokens import image_patches

NAME = "digits-av"
CLASSES = [str(d) for d in range(10)]
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
LANGUAGES = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan", "en-gb-x-gbcwmd"]
VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "croak", "klatt2", "klatt3"]
N_FRAMES = 20
N_COEFFS = 20
SNR_DB = (10.0, 30.0)
FEATURE_VERSION = 1  # bump when the audio recipe changes, so old caches are not reused


def voices(n: int) -> list[Voice]:
    """``n`` distinct voices from a fixed generator (independent of any seed, so the cache is shared)."""
    rng = np.random.default_rng(20240601)
    out: dict[str, Voice] = {}
    while len(out) < n:
        v = Voice(
            language=LANGUAGES[int(rng.integers(len(LANGUAGES)))],
            variant=VARIANTS[int(rng.integers(len(VARIANTS)))],
            speed=int(rng.integers(12, 21)) * 10,
            pitch=int(rng.integers(5, 16)) * 5,
        )
        out.setdefault(v.key, v)
    return list(out.values())


def _render(wav: np.ndarray, rate: int, rng: np.random.Generator, snr_db: tuple[float, float]) -> np.ndarray:
    speech = trim_silence(wav, rate)
    pad = rng.integers(0, rate // 10, size=2)  # up to 100 ms of capture slack at each end
    padded = np.pad(speech, (int(pad[0]), int(pad[1])))
    return mfcc_frames(add_noise(padded, float(rng.uniform(*snr_db)), rng), rate, n_frames=N_FRAMES, n_coeffs=N_COEFFS)


def audio_features(
    n_voices: int = 30, renditions: int = 3, snr_db: tuple[float, float] = SNR_DB
) -> np.ndarray:
    """Un-normalized MFCCs ``(10 digits, n_voices, renditions, 20, 20)``, from the cache or built once.

    Each rendition draws its SNR uniformly from ``snr_db``; lower it (e.g. ``(-5, 5)``) for a harder audio task.
    """
    snr_db = (float(snr_db[0]), float(snr_db[1]))
    vs = voices(n_voices)
    recipe = {"v": FEATURE_VERSION, "voices": [v.key for v in vs], "renditions": renditions, "snr": snr_db,
              "frames": N_FRAMES, "coeffs": N_COEFFS}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    root = cache_dir(NAME)
    path = root / f"mfcc-{digest}.npy"
    if path.exists():
        return np.load(path)
    espeak_path()  # fail early with the install hint
    feats = np.empty((len(WORDS), n_voices, renditions, N_FRAMES, N_COEFFS), dtype=np.float32)
    for d, word in enumerate(WORDS):
        for j, v in enumerate(vs):
            wav_path = root / "wav" / f"{word}_{v.key}.wav"
            if not wav_path.exists():
                synthesize(word, v, wav_path)
            wav, rate = read_wav(wav_path)
            rng = np.random.default_rng([d, j, FEATURE_VERSION])
            for r in range(renditions):
                feats[d, j, r] = _render(wav, rate, rng, snr_db)
    tmp = root / f"mfcc-{digest}.tmp.npy"
    np.save(tmp, feats)
    tmp.replace(path)
    return feats


def load_digits_av(
    *, seed: int = 0, n_voices: int = 30, renditions: int = 3, test_fraction: float = 0.25,
    test_voice_fraction: float = 0.2, snr_db: tuple[float, float] = SNR_DB,
) -> tuple[MultimodalDataset, MultimodalDataset]:
    """Stratified image split (``test_fraction``) with disjoint train/test voices (``test_voice_fraction``).

    ``n_voices``, ``renditions`` and ``snr_db`` shape the synthesized audio (see :func:`audio_features`).
    """
    from sklearn.datasets import load_digits

    if n_voices < 2:
        raise ValueError("n_voices must be >= 2 so train and test can have different speakers")
    digits = load_digits()
    images = digits.images.astype(np.float32) / 8.0 - 1.0
    feats = audio_features(n_voices, renditions, snr_db)
    vs = voices(n_voices)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_voices)
    n_test_voices = min(max(1, round(n_voices * test_voice_fraction)), n_voices - 1)
    test_voices, train_voices = np.sort(order[:n_test_voices]), np.sort(order[n_test_voices:])
    mean = feats[:, train_voices].mean(axis=(0, 1, 2, 3))
    std = feats[:, train_voices].std(axis=(0, 1, 2, 3)) + 1e-6

    skeleton = MultimodalDataset(NAME, {}, list(CLASSES),
                                 [{"label": int(t), "source": f"{NAME}:img{i}"} for i, t in enumerate(digits.target)])
    img_train, img_test = train_test_split(skeleton, test_fraction, seed)

    def pair(split: MultimodalDataset, voice_pool: np.ndarray) -> list[Sample]:
        out: list[Sample] = []
        for s in split.samples:
            i = int(s["source"].removeprefix(f"{NAME}:img"))
            j = int(rng.choice(voice_pool))
            r = int(rng.integers(renditions))
            audio = ((feats[s["label"], j, r] - mean) / std).astype(np.float32)
            out.append({
                "modalities": {"image": image_patches(images[i], 4), "audio": audio},
                "label": s["label"],
                "id": f"{s['source']}|{vs[j].key}#r{r}",
                "source": s["source"],
                "voice": vs[j].key,
            })
        return out

    modalities = {
        "image": ModalitySpec(token_dim=16, tokens=4),
        "audio": ModalitySpec(token_dim=N_COEFFS, tokens=N_FRAMES),
    }
    info = {
        "source": "scikit-learn load_digits (UCI) + espeak-ng synthesized speech",
        "real": {"image": True, "audio": False},
        "train_voices": [vs[j].key for j in train_voices],
        "test_voices": [vs[j].key for j in test_voices],
        "audio_norm_mean": mean.tolist(),
        "audio_norm_std": std.tolist(),
        "snr_db": list(snr_db),
    }
    train = MultimodalDataset(NAME, modalities, list(CLASSES), pair(img_train, train_voices), info)
    test = MultimodalDataset(NAME, dict(modalities), list(CLASSES), pair(img_test, test_voices), dict(info))
    return train, test
