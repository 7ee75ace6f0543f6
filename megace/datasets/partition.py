"""Non-IID partitioning of a dataset across edges and their devices.

Label skew is the usual Dirichlet recipe: for every class ``c`` draw edge shares ``q_c ~ Dir(alpha * 1_N)``
and cut that class's samples accordingly — small ``alpha`` gives each edge a few dominant classes, large
``alpha`` approaches IID (``alpha=inf`` is exactly uniform shares). Cutting works on groups of samples that
share a ``"source"``, so all views of one real recording stay on one edge. Each edge also sees only its
own modality subset (its sensors), and its personal test split follows the *same* shares ``q_c``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from megace.datasets.dataset import MultimodalDataset
from megace.datasets.splits import split_across_devices, train_test_split


@dataclass
class DeviceData:
    """What one simulated device replays: its slice of the edge's train and test samples."""

    device_id: int
    train: MultimodalDataset
    test: MultimodalDataset


@dataclass
class EdgeData:
    """One edge's personal data, already stripped to the edge's ``modalities``."""

    edge_id: int
    modalities: tuple[str, ...]
    train: MultimodalDataset
    test: MultimodalDataset
    devices: list[DeviceData] = field(default_factory=list)

    @property
    def label_distribution(self) -> np.ndarray:
        """Fraction of this edge's train samples per class."""
        counts = self.train.class_counts().astype(float)
        return counts / max(counts.sum(), 1.0)


def default_modality_sets(modalities: Sequence[str], n_edges: int) -> list[tuple[str, ...]]:
    """Edge 0 has every modality; the others cycle through single modalities (edge 1 the first, ...)."""
    names = tuple(modalities)
    return [names if e == 0 else (names[(e - 1) % len(names)],) for e in range(n_edges)]


def _groups(ds: MultimodalDataset) -> dict[int, list[list[int]]]:
    """Per class, the sample indices grouped by ``source`` (sorted, so the result is deterministic)."""
    by: dict[int, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, s in enumerate(ds.samples):
        by[int(s["label"])][str(s.get("source", i))].append(i)
    return {c: [by[c][k] for k in sorted(by[c])] for c in sorted(by)}


def _deal(groups: dict[int, list[list[int]]], shares: np.ndarray, rng: np.random.Generator) -> list[list[int]]:
    """Give each edge the fraction ``shares[c, e]`` of class ``c``'s groups (a random subset)."""
    n_edges = shares.shape[1]
    out: list[list[int]] = [[] for _ in range(n_edges)]
    for c, gs in groups.items():
        order = rng.permutation(len(gs))
        cuts = np.round(np.cumsum(shares[c]) * len(gs)).astype(int)
        start = 0
        for e, stop in enumerate(cuts):
            for g in order[start:stop]:
                out[e].extend(gs[g])
            start = stop
    return [sorted(idx) for idx in out]


def dirichlet_shares(n_classes: int, n_edges: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """``(n_classes, n_edges)`` rows summing to 1: how each class is spread over the edges."""
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if math.isinf(alpha):
        return np.full((n_classes, n_edges), 1.0 / n_edges)
    return rng.dirichlet(np.full(n_edges, alpha), size=n_classes)


def partition(
    dataset: MultimodalDataset,
    n_edges: int,
    alpha: float,
    modality_sets: Sequence[Sequence[str]] | None,
    seed: int,
    *,
    test: MultimodalDataset | None = None,
    test_fraction: float = 0.25,
    devices_per_edge: int = 1,
    min_train_per_edge: int = 2,
    max_tries: int = 1000,
) -> list[EdgeData]:
    """Split ``dataset`` over ``n_edges`` edges with Dirichlet(``alpha``) label skew.

    ``modality_sets[e]`` lists edge ``e``'s modalities (``None``: every edge has all of them). If ``test`` is
    given (e.g. the held-out split from :func:`load_dataset`), it is dealt with the same class shares, giving
    every edge a personal test set with its own skew; otherwise each edge's samples are split by
    ``test_fraction`` (grouped by source). Shares are redrawn until each edge has ``min_train_per_edge``
    train samples. Each edge's train and test are finally dealt to ``devices_per_edge`` devices.
    Every sample of ``dataset`` (and ``test``) ends up in exactly one edge.
    """
    if n_edges < 1:
        raise ValueError(f"n_edges must be >= 1, got {n_edges}")
    sets = [tuple(dataset.modalities)] * n_edges if modality_sets is None else [tuple(m) for m in modality_sets]
    if len(sets) != n_edges:
        raise ValueError(f"{len(sets)} modality sets for {n_edges} edges")
    for m in sets:
        if not m or set(m) - set(dataset.modalities):
            raise ValueError(f"bad modality set {m}; dataset has {sorted(dataset.modalities)}")

    rng = np.random.default_rng(seed)
    groups = _groups(dataset)
    n_classes = len(dataset.classes)
    for _ in range(max_tries):
        shares = dirichlet_shares(n_classes, n_edges, alpha, rng)
        parts = _deal(groups, shares, rng)
        if test is None:
            # The personal test split is carved out of each edge's part, so check what will remain for training.
            enough = all(len(p) * (1 - test_fraction) >= min_train_per_edge for p in parts)
        else:
            enough = all(len(p) >= min_train_per_edge for p in parts)
        if enough:
            break
    else:
        raise ValueError(
            f"could not give each of {n_edges} edges >= {min_train_per_edge} samples in {max_tries} draws "
            f"(alpha={alpha}, {len(dataset)} samples); raise alpha or lower n_edges"
        )
    test_parts = _deal(_groups(test), shares, rng) if test is not None else None

    edges: list[EdgeData] = []
    for e in range(n_edges):
        own = dataset.subset(parts[e])
        if test is not None and test_parts is not None:
            train, personal_test = own, test.subset(test_parts[e])
        else:
            train, personal_test = train_test_split(own, test_fraction, seed + e)
        train, personal_test = train.with_modalities(sets[e]), personal_test.with_modalities(sets[e])
        edge_seed = int(rng.integers(2**31))
        tr_dev = split_across_devices(train, devices_per_edge, edge_seed)
        te_dev = split_across_devices(personal_test, devices_per_edge, edge_seed + 1)
        devices = [DeviceData(d, tr_dev[d], te_dev[d]) for d in range(devices_per_edge)]
        edges.append(EdgeData(e, sets[e], train, personal_test, devices))
    return edges


def label_skew(edges: Sequence[EdgeData]) -> float:
    """Mean total-variation distance between each edge's train label distribution and the pooled one.

    0 means every edge sees the global class mix; values near 1 mean edges hold disjoint classes.
    """
    counts = np.stack([e.train.class_counts() for e in edges]).astype(float)
    pooled = counts.sum(axis=0) / counts.sum()
    per_edge = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    return float(0.5 * np.abs(per_edge - pooled).sum(axis=1).mean())
