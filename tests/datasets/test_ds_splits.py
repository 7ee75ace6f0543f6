"""Seeded splitting helpers: stratified, grouped by source, capped, dealt to devices."""

from __future__ import annotations

import numpy as np
import pytest

from megace.datasets import ModalitySpec, MultimodalDataset, split_across_devices, stratified_cap, train_test_split


def _grouped(n_sources: int = 40, views: int = 3) -> MultimodalDataset:
    samples = [
        {"modalities": {"a": np.full((1, 1), i, dtype=np.float32)}, "label": i % 4, "id": f"{i}#{v}", "source": str(i)}
        for i in range(n_sources)
        for v in range(views)
    ]
    return MultimodalDataset("g", {"a": ModalitySpec(1, 1)}, list("abcd"), samples)


def test_train_test_split_keeps_sources_together_and_stratifies() -> None:
    ds = _grouped()
    train, test = train_test_split(ds, 0.25, seed=3)
    assert len(train) + len(test) == len(ds)
    assert not {s["source"] for s in train} & {s["source"] for s in test}
    assert test.class_counts().tolist() == [6, 6, 6, 6]  # 10 sources per class, 2-3 of them in test, x3 views
    again = train_test_split(ds, 0.25, seed=3)[1]
    assert [s["id"] for s in again] == [s["id"] for s in test]
    other = train_test_split(ds, 0.25, seed=4)[1]
    assert [s["id"] for s in other] != [s["id"] for s in test]


def test_train_test_split_rejects_bad_fraction() -> None:
    with pytest.raises(ValueError):
        train_test_split(_grouped(), 1.0, seed=0)


def test_stratified_cap_keeps_size_and_every_class() -> None:
    ds = _grouped()
    capped = stratified_cap(ds, 17, seed=0)
    assert len(capped) == 17
    assert (capped.class_counts() >= 4).all()
    assert stratified_cap(ds, 1000, seed=0) is ds


def test_split_across_devices_covers_each_sample_once() -> None:
    ds = _grouped()
    parts = split_across_devices(ds, 7, seed=1)
    ids = [s["id"] for p in parts for s in p]
    assert sorted(ids) == sorted(s["id"] for s in ds)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
