"""digits-av: real digit images + espeak-ng speech; voice-disjoint splits, caching, and the missing-espeak error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from megace.datasets import MultimodalDataset, load_dataset, speech
from megace.datasets import digits_av as av


def test_shapes_dtypes_and_classes(digits_av: tuple[MultimodalDataset, MultimodalDataset]) -> None:
    train, test = digits_av
    assert len(train) + len(test) == 1797
    assert 0.2 < len(test) / 1797 < 0.3
    for ds in (train, test):
        ds.validate()
        assert {m: s.shape for m, s in ds.modalities.items()} == {"image": (4, 16), "audio": (20, 20)}
        assert (ds.class_counts() > 0).all() and len(ds.classes) == 10
        assert ds.stack("image").min() >= -1 and ds.stack("image").max() <= 1
    assert abs(float(train.stack("audio").mean())) < 0.2


def test_image_patches_are_quadrants(digits_av: tuple[MultimodalDataset, MultimodalDataset]) -> None:
    from sklearn.datasets import load_digits

    train, _ = digits_av
    s = train[0]
    img = load_digits().images[int(s["source"].removeprefix("digits-av:img"))] / 8.0 - 1.0
    assert np.allclose(s["modalities"]["image"][1].reshape(4, 4), img[:4, 4:])  # top-right quadrant


def test_voices_and_images_are_disjoint_between_splits(digits_av: tuple[MultimodalDataset, MultimodalDataset]) -> None:
    train, test = digits_av
    assert {s["voice"] for s in train}.isdisjoint({s["voice"] for s in test})
    assert {s["source"] for s in train}.isdisjoint({s["source"] for s in test})
    assert set(train.info["test_voices"]) == {s["voice"] for s in test}


def test_determinism_by_seed(av_cache: Path, av_options: dict[str, int]) -> None:
    a = load_dataset("digits-av", seed=3, **av_options)[1]
    b = load_dataset("digits-av", seed=3, **av_options)[1]
    c = load_dataset("digits-av", seed=4, **av_options)[1]
    assert [s["id"] for s in a] == [s["id"] for s in b]
    assert np.array_equal(a.stack("audio"), b.stack("audio"))
    assert [s["id"] for s in a] != [s["id"] for s in c]


def test_cache_is_reused(
    digits_av, av_cache: Path, av_options: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    cached = list(av_cache.glob("digits-av/mfcc-*.npy"))
    assert cached and list(av_cache.glob("digits-av/wav/*.wav"))
    first = av.audio_features(**av_options)
    stamps = {p: p.stat().st_mtime_ns for p in cached}

    def not_with_a_warm_cache(*args, **kwargs):
        raise AssertionError("audio was synthesized, read or featurized although the cache is warm")

    # a warm cache is read back as is: no speech synthesis, no WAV reading, no MFCC computation, no rewrite
    for name in ("synthesize", "read_wav", "_render"):
        monkeypatch.setattr(av, name, not_with_a_warm_cache)
    second = av.audio_features(**av_options)
    assert np.array_equal(first, second)
    assert first.shape == (10, 12, 2, 20, 20)
    assert {p: p.stat().st_mtime_ns for p in cached} == stamps


def test_missing_espeak_gives_install_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEGACE_CACHE", str(tmp_path))  # empty cache: synthesis is needed
    monkeypatch.setattr(speech.shutil, "which", lambda name: None)
    with pytest.raises(speech.EspeakMissingError, match="apt-get install -y espeak-ng"):
        load_dataset("digits-av", seed=0, n_voices=3, renditions=1)


def test_espeak_speech_differs_by_digit(av_cache: Path, av_options: dict[str, int]) -> None:
    feats = av.audio_features(**av_options)
    same = np.abs(feats[7, 0, 0] - feats[7, 0, 1]).mean()  # one utterance, two noisy renditions
    other = np.abs(feats[7, 0, 0] - feats[3, 0, 0]).mean()  # same voice, another word
    assert other > same


def test_recipe_changes_get_their_own_cache_entry(av_cache: Path) -> None:
    clean = av.audio_features(n_voices=2, renditions=1, snr_db=(40, 40))
    noisy = av.audio_features(n_voices=2, renditions=1, snr_db=(-5, -5))
    assert len(list(av_cache.glob("digits-av/mfcc-*.npy"))) >= 3
    assert not np.array_equal(clean, noisy)
