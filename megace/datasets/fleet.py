"""A fleet-like split of ``mnist-av``: many edges, several devices each, three kinds of heterogeneity.

* **Label skew**: the usual Dirichlet(``alpha``) shares over edges (:func:`megace.datasets.partition`); the
  personal test split follows the same shares.
* **Feature skew**: each edge hears only its own speakers (a disjoint slice of the train voices; its personal
  test uses the same speakers, another rendition), and each device has its own sensor: image gain, offset,
  noise and placement (a shift of the digit), audio gain and noise. ``feature_skew`` scales all of it (0: none).
* **Modality availability**: edges cycle through both modalities, image only, audio only.

An edge's own data is kept scarce on purpose (``train_per_edge``, default 160: 16 per class on average), which
is where a fleet should pay; a late edge joins with ``late_per_class`` samples per class. The global test is a
separate slice of the test split with unseen speakers and no device skew. All of it is deterministic from the
seed; the device transforms are recorded in ``Fleet.devices`` so tests can check them independently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from megace.datasets.dataset import MultimodalDataset, Sample
from megace.datasets.mnist_av import audio_bank, load_mnist_av, mnist_images
from megace.datasets.partition import DeviceData, EdgeData, partition
from megace.datasets.splits import stratified_cap, train_test_split
from megace.datasets.tokens import image_patches

MODALITY_CYCLE: tuple[tuple[str, ...], ...] = (("audio", "image"), ("image",), ("audio",))


@dataclass(frozen=True)
class FleetSpec:
    """The knobs of one fleet (every arm of a comparison uses the same spec and seed)."""

    edges: int = 10
    devices_per_edge: int = 3
    alpha: float = 0.5
    train_per_edge: int = 160
    test_per_edge: int = 60
    feature_skew: float = 0.5
    late_per_class: int = 5
    global_test: int = 300
    n_voices: int = 60
    seed: int = 0

    def __post_init__(self) -> None:
        if self.edges < 2 or self.devices_per_edge < 1:
            raise ValueError("a fleet needs >= 2 edges and >= 1 device per edge")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0 (inf: no label skew), got {self.alpha}")
        if not 0 <= self.feature_skew <= 2:
            raise ValueError(f"feature_skew must be in [0, 2], got {self.feature_skew}")


@dataclass(frozen=True)
class DeviceSkew:
    """One device's sensor: what it does to every sample it publishes."""

    gain: float
    offset: float
    noise: float
    shift: tuple[int, int]
    audio_gain: float
    audio_noise: float


@dataclass
class Fleet:
    edges: list[EdgeData]
    late: EdgeData
    global_test: MultimodalDataset
    devices: dict[tuple[int, int], DeviceSkew] = field(default_factory=dict)
    site_voices: dict[int, list[int]] = field(default_factory=dict)


def modality_sets(n_edges: int) -> list[tuple[str, ...]]:
    """Edge ``e`` gets ``MODALITY_CYCLE[e % 3]``: both, image only, audio only, both, ..."""
    return [MODALITY_CYCLE[e % len(MODALITY_CYCLE)] for e in range(n_edges)]


def device_skew(strength: float, rng: np.random.Generator) -> DeviceSkew:
    """Draw one device's sensor; every parameter is neutral at ``strength`` 0."""
    reach = round(2 * strength)
    return DeviceSkew(
        gain=float(np.exp(rng.normal(0.0, 0.3 * strength))),
        offset=float(rng.normal(0.0, 0.2 * strength)),
        noise=float(rng.uniform(0.0, 0.4 * strength)),
        shift=(int(rng.integers(-reach, reach + 1)), int(rng.integers(-reach, reach + 1))),
        audio_gain=float(np.exp(rng.normal(0.0, 0.3 * strength))),
        audio_noise=float(rng.uniform(0.0, 0.6 * strength)),
    )


def skewed_image(img: np.ndarray, skew: DeviceSkew, rng: np.random.Generator) -> np.ndarray:
    """The 14x14 image as this device captures it: shifted (background fills in), gain, offset, noise."""
    out = np.full_like(img, -1.0)
    dy, dx = skew.shift
    h, w = img.shape
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = img[max(-dy, 0):h + min(-dy, 0),
                                                                     max(-dx, 0):w + min(-dx, 0)]
    out = out * skew.gain + skew.offset + rng.normal(0.0, 1.0, out.shape).astype(np.float32) * skew.noise
    return out.astype(np.float32)


def _resample(ds: MultimodalDataset, skew: DeviceSkew, voices: np.ndarray, renditions: tuple[int, ...],
              bank: np.ndarray, rng: np.random.Generator) -> MultimodalDataset:
    images, _ = mnist_images()
    out: list[Sample] = []
    for s in ds.samples:
        mods = {}
        if "image" in s["modalities"]:
            mods["image"] = image_patches(skewed_image(images[int(s["image"])], skew, rng), 7)
        v, r = int(s["voice"]), int(s["rendition"])
        if "audio" in s["modalities"]:
            v, r = int(rng.choice(voices)), int(rng.choice(renditions))
            clean = bank[int(s["label"]), v, r]
            noise = rng.normal(0.0, 1.0, clean.shape).astype(np.float32) * skew.audio_noise
            mods["audio"] = (clean * skew.audio_gain + noise).astype(np.float32)
        out.append({**s, "modalities": mods, "voice": v, "rendition": r})
    return MultimodalDataset(ds.name, dict(ds.modalities), list(ds.classes), out, dict(ds.info))


def _join(parts: list[MultimodalDataset], like: MultimodalDataset) -> MultimodalDataset:
    return MultimodalDataset(like.name, dict(like.modalities), list(like.classes),
                             [s for p in parts for s in p.samples], dict(like.info))


def _skew_edge(edge: EdgeData, spec: FleetSpec, voices: np.ndarray, bank: np.ndarray,
               devices: dict[tuple[int, int], DeviceSkew]) -> EdgeData:
    """Apply the site's speakers and each device's sensor to the edge's train and personal test."""
    n_r = bank.shape[2]
    train_r, test_r = tuple(range(max(1, n_r - 1))), (n_r - 1,)
    new_devices = []
    for d in edge.devices:
        rng = np.random.default_rng([spec.seed, edge.edge_id, d.device_id, 3])
        skew = device_skew(spec.feature_skew, rng)
        devices[(edge.edge_id, d.device_id)] = skew
        new_devices.append(DeviceData(d.device_id, _resample(d.train, skew, voices, train_r, bank, rng),
                                      _resample(d.test, skew, voices, test_r, bank, rng)))
    return EdgeData(edge.edge_id, edge.modalities, _join([d.train for d in new_devices], edge.train),
                    _join([d.test for d in new_devices], edge.test), new_devices)


def build_fleet(spec: FleetSpec) -> Fleet:
    """The fleet for ``spec``: edges (label + feature + modality skew), a late edge, the global test."""
    train, test = load_mnist_av(seed=spec.seed, n_voices=spec.n_voices)
    bank, train_v, _ = audio_bank(train.info["n_voices"], train.info["renditions"], spec.seed)
    n_classes = len(train.classes)
    # the late edge's data first (uniform classes, few per class), so no other edge holds those images
    rest, late_train = train_test_split(train, min(0.5, spec.late_per_class * n_classes / len(train)), spec.seed + 7)
    late_train = stratified_cap(late_train, spec.late_per_class * n_classes, spec.seed + 8)
    pool, global_test = train_test_split(test, min(0.9, spec.global_test / len(test)), spec.seed + 9)
    late_test = stratified_cap(pool, 60, spec.seed + 10)
    taken = {s["id"] for s in late_test.samples}
    pool = pool.subset([i for i, s in enumerate(pool.samples) if s["id"] not in taken])
    train_pool = stratified_cap(rest, spec.edges * spec.train_per_edge, spec.seed + 11)
    test_pool = stratified_cap(pool, spec.edges * spec.test_per_edge, spec.seed + 12)
    parts = partition(train_pool, spec.edges, spec.alpha, modality_sets(spec.edges), spec.seed, test=test_pool,
                      devices_per_edge=spec.devices_per_edge, min_train_per_edge=8)
    # each site hears its own speakers: a disjoint slice of the train voices (the late edge gets one too)
    order = np.random.default_rng([spec.seed, 13]).permutation(train_v)
    slots = spec.edges + 1
    per_site = {e: sorted(int(v) for v in order[e::slots]) for e in range(slots)}
    if spec.feature_skew == 0:
        per_site = {e: sorted(int(v) for v in train_v) for e in range(slots)}
    devices: dict[tuple[int, int], DeviceSkew] = {}
    edges = [_skew_edge(e, spec, np.array(per_site[e.edge_id]), bank, devices) for e in parts]
    late_parts = partition(late_train, 1, math.inf, [("audio", "image")], spec.seed, test=late_test,
                           devices_per_edge=spec.devices_per_edge, min_train_per_edge=1)
    late_raw = late_parts[0]
    late_raw = EdgeData(spec.edges, late_raw.modalities, late_raw.train, late_raw.test, late_raw.devices)
    late = _skew_edge(late_raw, spec, np.array(per_site[spec.edges]), bank, devices)
    return Fleet(edges, late, global_test, devices, per_site)


__all__ = ["MODALITY_CYCLE", "DeviceSkew", "Fleet", "FleetSpec", "build_fleet", "device_skew", "modality_sets",
           "skewed_image"]
