"""Dirichlet edge partitioning: exact coverage, skew vs alpha, modality subsets, personal tests, devices."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from megace.datasets import MultimodalDataset, default_modality_sets, label_skew, partition


def _ids(datasets) -> list[str]:
    return [s["id"] for ds in datasets for s in ds]


def test_every_sample_lands_on_exactly_one_edge(basicmotions: tuple[MultimodalDataset, MultimodalDataset]) -> None:
    train, test = basicmotions
    edges = partition(train, 4, 0.3, None, seed=1, test=test)
    assert Counter(_ids(e.train for e in edges)) == Counter(s["id"] for s in train)
    assert Counter(_ids(e.test for e in edges)) == Counter(s["id"] for s in test)
    # All views of one recording stay on one edge.
    owner = {s["source"]: e.edge_id for e in edges for s in e.train}
    assert all(owner[s["source"]] == e.edge_id for e in edges for s in e.train)


def test_without_test_set_edges_split_their_own_samples(digits_av) -> None:
    train, _ = digits_av
    edges = partition(train, 3, 1.0, None, seed=0, test_fraction=0.25)
    assert Counter(_ids([e.train for e in edges] + [e.test for e in edges])) == Counter(s["id"] for s in train)
    for e in edges:
        assert not {s["source"] for s in e.train} & {s["source"] for s in e.test}
        assert 0.15 < len(e.test) / (len(e.train) + len(e.test)) < 0.35


def test_skew_grows_as_alpha_shrinks(digits_av) -> None:
    train, _ = digits_av
    skew = {
        alpha: np.mean([label_skew(partition(train, 5, alpha, None, seed=s)) for s in range(5)])
        for alpha in (0.05, 0.5, 5.0, 100.0)
    }
    assert skew[0.05] > skew[0.5] > skew[5.0] > skew[100.0]
    assert skew[0.05] > 0.6 and skew[100.0] < 0.1
    assert label_skew(partition(train, 5, float("inf"), None, seed=0)) < 0.05


def test_personal_test_split_has_the_same_skew(basicmotions) -> None:
    train, test = basicmotions
    edges = partition(train, 3, 0.2, None, seed=4, test=test, min_train_per_edge=1)
    for e in edges:
        tr = e.train.class_counts() / max(len(e.train), 1)
        te = e.test.class_counts() / max(len(e.test), 1)
        if len(e.test) >= 5:
            assert np.abs(tr - te).sum() / 2 < 0.35
        # A class the edge never trains on is (almost) absent from its personal test set.
        assert te[tr == 0].sum() <= 0.2


def test_modality_subsets_are_respected(basicmotions) -> None:
    train, test = basicmotions
    sets = default_modality_sets(train.modalities, 3)
    assert sets == [("accel", "gyro"), ("accel",), ("gyro",)]
    edges = partition(train, 3, 1.0, sets, seed=0, test=test, devices_per_edge=2)
    for e, wanted in zip(edges, sets, strict=True):
        assert e.modalities == wanted
        for ds in [e.train, e.test] + [d.train for d in e.devices] + [d.test for d in e.devices]:
            assert tuple(ds.modalities) == wanted
            assert all(tuple(s["modalities"]) == wanted for s in ds)
            ds.validate()
    assert set(train[0]["modalities"]) == {"accel", "gyro"}  # the input dataset is not stripped


def test_devices_split_each_edge_exactly(basicmotions) -> None:
    train, test = basicmotions
    for e in partition(train, 2, 1.0, None, seed=2, test=test, devices_per_edge=3):
        assert len(e.devices) == 3
        assert sorted(_ids(d.train for d in e.devices)) == sorted(_ids([e.train]))
        assert sorted(_ids(d.test for d in e.devices)) == sorted(_ids([e.test]))


def test_partition_is_deterministic(basicmotions) -> None:
    train, test = basicmotions
    a = partition(train, 4, 0.5, None, seed=7, test=test, devices_per_edge=2)
    b = partition(train, 4, 0.5, None, seed=7, test=test, devices_per_edge=2)
    c = partition(train, 4, 0.5, None, seed=8, test=test, devices_per_edge=2)
    key = lambda edges: [_ids(d.train for d in e.devices) + _ids(d.test for d in e.devices) for e in edges]  # noqa: E731
    assert key(a) == key(b)
    assert key(a) != key(c)


def test_min_train_per_edge_is_enforced_or_refused(basicmotions) -> None:
    train, test = basicmotions
    for e in partition(train, 4, 0.1, None, seed=0, test=test, min_train_per_edge=12):
        assert len(e.train) >= 12
    with pytest.raises(ValueError, match="could not give"):
        partition(train, 4, 0.1, None, seed=0, test=test, min_train_per_edge=100, max_tries=20)


def test_bad_arguments_are_rejected(basicmotions) -> None:
    train, _ = basicmotions
    with pytest.raises(ValueError):
        partition(train, 2, 1.0, [("accel",)], seed=0)  # one set for two edges
    with pytest.raises(ValueError):
        partition(train, 2, 1.0, [("accel",), ("camera",)], seed=0)
    with pytest.raises(ValueError):
        partition(train, 2, 0.0, None, seed=0)
