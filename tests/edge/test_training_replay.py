"""Bounded replay buffer: caps, drop-oldest, drop counters, thread safety."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from edge_agent.training.replay import ReplayBuffer


def test_per_device_cap_drops_oldest_of_that_device() -> None:
    buf = ReplayBuffer(max_total=100, max_per_device=3)
    for i in range(5):
        buf.add("a", {"env": np.full(2, i)}, label=i % 2)
    buf.add("b", {"env": np.zeros(2)}, label=0)
    items = buf.snapshot()
    assert [s.label for s in items if s.device_id == "a"] == [0, 1, 0]  # i = 2, 3, 4 kept
    assert [float(s.modalities["env"][0]) for s in items if s.device_id == "a"] == [2.0, 3.0, 4.0]
    assert buf.dropped == {"device:a": 2, "all": 2}
    assert buf.counts()["devices"] == {"a": 3, "b": 1}


def test_per_modality_and_total_caps() -> None:
    buf = ReplayBuffer(max_total=4, max_per_device=None, max_per_modality=2)
    buf.add("a", {"imu": np.zeros(3)}, 0)
    buf.add("a", {"imu": np.zeros(3), "env": np.zeros(2)}, 1)
    buf.add("b", {"env": np.zeros(2)}, 2)
    buf.add("b", {"imu": np.zeros(3)}, 3)  # third imu sample: oldest imu (label 0) goes
    assert [s.label for s in buf.snapshot()] == [1, 2, 3]
    assert buf.dropped["modality:imu"] == 1
    for label in (4, 5):
        buf.add("c", {"audio": np.zeros(1)}, label)
    assert len(buf) == 4 and buf.dropped["total"] == 1
    assert [s.label for s in buf.snapshot()] == [2, 3, 4, 5]
    assert buf.counts()["modalities"] == {"env": 1, "imu": 1, "audio": 2}


def test_buffer_stores_copies() -> None:
    buf = ReplayBuffer()
    arr = np.ones(3, dtype=np.float64)
    item = buf.add("a", {"env": arr}, 0)
    arr[:] = 7
    assert item.modalities["env"].dtype == np.float32 and item.modalities["env"].tolist() == [1, 1, 1]
    with pytest.raises(ValueError):
        ReplayBuffer(max_total=0)


def test_concurrent_adds_respect_caps() -> None:
    buf = ReplayBuffer(max_total=50, max_per_device=20)

    def writer(dev: str) -> None:
        for i in range(200):
            buf.add(dev, {"env": np.zeros(2)}, i % 3)

    threads = [threading.Thread(target=writer, args=(f"d{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(buf) == 50
    assert buf.dropped["all"] == 4 * 200 - 50
    assert all(v <= 20 for v in buf.counts()["devices"].values())
    seqs = [s.seq for s in buf.snapshot()]
    assert seqs == sorted(seqs) and len(set(seqs)) == 50
