"""Bounded replay buffer: caps, drop-oldest, drop counters, thread safety."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from edge_agent.training.replay import BufferedSample, ReplayBuffer


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


def test_byte_caps_drop_the_oldest_of_the_device_then_of_the_buffer() -> None:
    """Counts alone let a device fill memory with its largest arrays: 1,000-float samples are 4,000 bytes."""
    buf = ReplayBuffer(max_total=100, max_per_device=None, max_bytes=20_000, max_bytes_per_device=12_000)
    for i in range(4):  # device a: 16,000 bytes offered, 12,000 allowed -> its oldest (label 0) goes
        buf.add("a", {"imu": np.full(1000, i)}, label=i)
    assert [s.label for s in buf.snapshot()] == [1, 2, 3]
    assert buf.dropped == {"device_bytes:a": 1, "all": 1} and buf.counts()["bytes"] == 12_000
    buf.add("b", {"imu": np.zeros(500)}, label=10)  # 2,000 bytes: 14,000 in all, under both caps
    buf.add("b", {"imu": np.zeros(1500)}, label=11)  # 6,000 more: 20,000, still fits
    assert buf.counts()["bytes"] == 20_000 and len(buf) == 5
    buf.add("b", {"imu": np.zeros(250)}, label=12)  # 1,000 more: the buffer's oldest (a's label 1) goes
    assert [s.label for s in buf.snapshot()] == [2, 3, 10, 11, 12]
    assert buf.dropped["bytes"] == 1 and buf.counts()["bytes"] == 17_000
    assert sum(s.nbytes for s in buf.snapshot()) == 17_000


def test_byte_caps_hold_after_a_restore() -> None:
    items = [BufferedSample(seq=i, device_id="a", modalities={"imu": np.zeros(1000, np.float32)}, label=0)
             for i in range(5)]
    buf = ReplayBuffer(max_total=100, max_per_device=None, max_bytes_per_device=8_000)
    buf.restore(items)
    assert [s.seq for s in buf.snapshot()] == [3, 4] and buf.counts()["bytes"] == 8_000


@pytest.mark.parametrize("cap", ["max_bytes", "max_bytes_per_device"])
def test_a_byte_cap_below_one_is_refused(cap: str) -> None:
    with pytest.raises(ValueError, match="caps"):
        ReplayBuffer(**{cap: 0})


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


def _item(seq: int, device: str, label: int = 0, **mods: float) -> BufferedSample:
    return BufferedSample(seq=seq, device_id=device, label=label,
                          modalities={m: np.full(2, v, np.float32) for m, v in (mods or {"env": 0.0}).items()})


def test_restore_keeps_each_samples_seq_and_numbering_continues_after_the_newest() -> None:
    """After a restart the buffer comes back from the checkpoint with the same seqs (so the held-out split
    does not move) and new samples are numbered after the newest restored one."""
    buf = ReplayBuffer(max_total=10, max_per_device=None)
    buf.restore([_item(7, "b", 1), _item(3, "a", 0), _item(5, "a", 2, imu=1.0)])
    assert [(s.seq, s.device_id, s.label) for s in buf.snapshot()] == [(3, "a", 0), (5, "a", 2), (7, "b", 1)]
    # two 2-float env arrays and one 2-float imu array: 3 x 8 bytes
    assert buf.counts() == {"total": 3, "bytes": 24, "devices": {"a": 2, "b": 1}, "modalities": {"env": 2, "imu": 1}}
    assert buf.add("c", {"env": np.zeros(2)}, 0).seq == 8
    with pytest.raises(ValueError, match=r"^restore needs an empty buffer$"):
        buf.restore([_item(1, "a")])
    assert len(buf) == 4


def test_restore_applies_the_caps_of_the_new_configuration() -> None:
    per_device = ReplayBuffer(max_total=10, max_per_device=2)
    per_device.restore([_item(i, "a", i) for i in range(4)])
    assert [s.seq for s in per_device.snapshot()] == [2, 3] and per_device.dropped == {"device:a": 2, "all": 2}
    per_modality = ReplayBuffer(max_total=10, max_per_device=None, max_per_modality=1)
    per_modality.restore([_item(1, "a", imu=1.0), _item(2, "b", imu=2.0), _item(3, "b", env=0.0)])
    assert [s.seq for s in per_modality.snapshot()] == [2, 3] and per_modality.dropped["modality:imu"] == 1
    total = ReplayBuffer(max_total=2, max_per_device=None)
    total.restore([_item(i, "a") for i in (9, 4, 6)])
    assert [s.seq for s in total.snapshot()] == [6, 9] and total.dropped == {"total": 1, "all": 1}


def test_caps_must_be_positive_and_none_means_unbounded() -> None:
    for caps in ({"max_total": 0}, {"max_per_device": 0}, {"max_per_modality": 0}, {"max_per_device": -1}):
        with pytest.raises(ValueError, match="caps must be"):
            ReplayBuffer(**caps)
    buf = ReplayBuffer(max_total=1000, max_per_device=None, max_per_modality=None)
    for _ in range(300):
        buf.add("a", {"env": np.zeros(1)}, 0)
    assert len(buf) == 300 and buf.dropped == {}
    capped = ReplayBuffer(max_total=1000, max_per_device=1, max_per_modality=1)
    capped.add("a", {"env": np.zeros(1)}, 0)
    capped.add("a", {"env": np.zeros(1)}, 1)
    assert [s.label for s in capped.snapshot()] == [1] and capped.dropped["all"] == 1


def test_float32_input_is_copied_too_and_samples_expose_their_modalities() -> None:
    buf = ReplayBuffer()
    arr = np.ones((2, 3), np.float32)
    item = buf.add("a", {"imu": arr, "env": [1, 2]}, np.int64(3))
    arr[:] = 9
    assert item.modalities["imu"].tolist() == [[1, 1, 1], [1, 1, 1]]
    assert item.modalities["env"].dtype == np.float32 and item.modalities["env"].tolist() == [1, 2]
    assert item.presence == ("env", "imu") and type(item.label) is int and item.label == 3
    assert item.as_sample() == {"modalities": item.modalities, "label": 3}


def test_counts_forget_devices_and_modalities_once_all_their_samples_are_gone() -> None:
    buf = ReplayBuffer(max_total=2, max_per_device=None)
    buf.add("old", {"audio": np.zeros(1)}, 0)
    buf.add("new", {"env": np.zeros(1)}, 0)
    buf.add("new", {"env": np.zeros(1)}, 1)
    assert buf.counts() == {"total": 2, "bytes": 8, "devices": {"new": 2}, "modalities": {"env": 2}}
    assert buf.dropped == {"total": 1, "all": 1}


def test_evictions_through_one_cap_are_skipped_by_the_others() -> None:
    """A sample evicted by the total cap is still listed in its device's queue; the device cap must skip it
    and evict that device's oldest sample that is still there."""
    buf = ReplayBuffer(max_total=3, max_per_device=2, max_per_modality=2)
    buf.add("a", {"env": np.zeros(1)}, 0)  # seq 0
    buf.add("b", {"imu": np.zeros(1)}, 1)  # seq 1
    buf.add("b", {"imu": np.zeros(1)}, 2)  # seq 2
    buf.add("a", {"env": np.zeros(1)}, 3)  # seq 3: total cap evicts seq 0 (a's oldest)
    buf.add("a", {"env": np.zeros(1)}, 4)  # seq 4: total cap evicts seq 1
    buf.add("a", {"env": np.zeros(1)}, 5)  # seq 5: a has 3 -> its oldest still present (seq 3) goes
    assert [s.seq for s in buf.snapshot()] == [2, 4, 5]
    assert buf.dropped == {"total": 2, "device:a": 1, "all": 3}
    buf.add("b", {"imu": np.zeros(1)}, 6)  # seq 6: b has 2 (2, 6); total cap evicts the oldest overall (2)
    assert [s.seq for s in buf.snapshot()] == [4, 5, 6]
    buf.add("c", {"env": np.zeros(1)}, 7)  # env now 3 > 2: env's oldest present (seq 4) goes
    assert [s.seq for s in buf.snapshot()] == [5, 6, 7] and buf.dropped["modality:env"] == 1
