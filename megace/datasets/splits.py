"""Seeded, stratified, leakage-free splitting of a ``MultimodalDataset``.

Splits work on *groups* of samples sharing a ``"source"`` so that augmented or re-paired copies of one
real recording stay on one side; within each class, groups are shuffled and cut.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from megace.datasets.dataset import MultimodalDataset


def _groups_by_class(ds: MultimodalDataset) -> dict[int, dict[str, list[int]]]:
    by_class: dict[int, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, s in enumerate(ds.samples):
        by_class[int(s["label"])][str(s.get("source", i))].append(i)
    return by_class


def train_test_split(
    ds: MultimodalDataset, test_fraction: float, seed: int
) -> tuple[MultimodalDataset, MultimodalDataset]:
    """Stratified split by class, grouped by ``source``; each class with >= 2 groups gets >= 1 test group."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train_idx: list[int] = []
    test_idx: list[int] = []
    by_class = _groups_by_class(ds)
    for label in sorted(by_class):
        keys = sorted(by_class[label])
        rng.shuffle(keys)
        n_test = round(len(keys) * test_fraction)
        if len(keys) >= 2:
            n_test = min(max(n_test, 1), len(keys) - 1)
        for k in keys[:n_test]:
            test_idx.extend(by_class[label][k])
        for k in keys[n_test:]:
            train_idx.extend(by_class[label][k])
    return ds.subset(sorted(train_idx)), ds.subset(sorted(test_idx))


def stratified_cap(ds: MultimodalDataset, max_samples: int, seed: int) -> MultimodalDataset:
    """Keep at most ``max_samples`` samples, preserving class proportions (every present class keeps >= 1)."""
    if max_samples >= len(ds):
        return ds
    if max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")
    rng = np.random.default_rng(seed)
    labels = ds.labels
    present = np.unique(labels)
    counts = np.array([(labels == c).sum() for c in present])
    quota = np.maximum(1, np.floor(counts * max_samples / len(ds)).astype(int))
    # Hand out the rounding remainder to the largest classes, never exceeding the cap.
    order = np.argsort(-counts, kind="stable")
    j = 0
    while quota.sum() < max_samples and j < 10 * len(order):
        c = order[j % len(order)]
        if quota[c] < counts[c]:
            quota[c] += 1
        j += 1
    while quota.sum() > max_samples:
        c = order[np.argmax(quota[order] > 1)]
        quota[c] -= 1
    keep: list[int] = []
    for c, q in zip(present, quota, strict=True):
        idx = np.flatnonzero(labels == c)
        keep.extend(rng.choice(idx, size=int(q), replace=False).tolist())
    return ds.subset(sorted(keep))


def split_across_devices(ds: MultimodalDataset, n_devices: int, seed: int) -> list[MultimodalDataset]:
    """Shuffle and deal the samples round-robin to ``n_devices`` devices (sizes differ by at most one)."""
    if n_devices < 1:
        raise ValueError(f"n_devices must be >= 1, got {n_devices}")
    order = np.random.default_rng(seed).permutation(len(ds))
    return [ds.subset(sorted(order[d::n_devices].tolist())) for d in range(n_devices)]
