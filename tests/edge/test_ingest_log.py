"""The ingest log on real files: group commit, segments per checkpoint, torn tails after a crash."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import msgpack
import pytest

from edge_agent.ingestlog import IngestLog


def frame(topic: str, payload: bytes, retained: bool = False) -> bytes:
    """The documented frame layout, built by hand: u32 length | u32 crc32 | msgpack [topic, payload, retained]."""
    body = msgpack.packb([topic, payload, retained], use_bin_type=True)
    return struct.pack("<II", len(body), zlib.crc32(body)) + body


def messages(n: int, start: int = 0) -> list[tuple[str, bytes, bool]]:
    return [(f"megace/v1/site/s/device/d{i % 3}/up/features", bytes([i % 256]) * (i + 1), i % 4 == 1)
            for i in range(start, n)]


@pytest.mark.parametrize("fsync", [True, False])
def test_appended_messages_are_on_disk_in_the_documented_layout_only_after_commit(tmp_path: Path, fsync: bool) -> None:
    log = IngestLog(tmp_path, fsync=fsync)
    msgs = messages(5)
    for t, p, r in msgs:
        log.append(t, p, r)
    assert log.pending == 5
    assert list(IngestLog(tmp_path).replay(0)) == []  # nothing durable yet
    assert log.commit() == 5 and log.pending == 0 and log.commit() == 0
    (seg,) = sorted(tmp_path.glob("seg-*.log"))
    assert seg.read_bytes() == b"".join(frame(t, p, r) for t, p, r in msgs)
    assert log.frames_written == 5 and log.bytes_written == seg.stat().st_size
    assert list(IngestLog(tmp_path).replay(0)) == msgs


def test_a_mark_splits_segments_and_replay_starts_at_the_mark(tmp_path: Path) -> None:
    log = IngestLog(tmp_path)
    before, after = messages(3), messages(6, 3)
    for t, p, r in before:
        log.append(t, p, r)
    mark = log.mark()  # a checkpoint snapshot: `before` is in it
    for t, p, r in after:
        log.append(t, p, r)
    log.commit()  # one commit, two segments
    assert len(log.segments()) == 2 and log.segments()[-1] == mark
    assert list(IngestLog(tmp_path).replay(mark)) == after
    assert list(IngestLog(tmp_path).replay(0)) == before + after
    assert log.drop_before(mark) == 1 and log.segments() == [mark]
    assert list(IngestLog(tmp_path).replay(0)) == after


def test_a_torn_tail_is_skipped_and_a_later_runs_segment_still_replays(tmp_path: Path) -> None:
    log = IngestLog(tmp_path)
    first = messages(4)
    for t, p, r in first:
        log.append(t, p, r)
    log.commit()
    log.close()
    (seg,) = tmp_path.glob("seg-*.log")
    with seg.open("ab") as f:
        f.write(frame("megace/v1/site/s/device/d9/up/features", b"x" * 50)[:-7])  # the crash hit mid-write
    restarted = IngestLog(tmp_path)
    assert list(restarted.replay(0)) == first
    later = messages(7, 4)
    for t, p, r in later:
        restarted.append(t, p, r)
    restarted.commit()
    assert restarted.segments() == [1, 2]  # never appended after the torn tail
    assert list(IngestLog(tmp_path).replay(0)) == first + later


def test_a_corrupt_frame_ends_its_segment(tmp_path: Path) -> None:
    log = IngestLog(tmp_path)
    msgs = messages(3)
    for t, p, r in msgs:
        log.append(t, p, r)
    log.commit()
    (seg,) = tmp_path.glob("seg-*.log")
    data = bytearray(seg.read_bytes())
    second = len(frame(*msgs[0]))
    data[second + 8] ^= 0xFF  # first body byte of the second frame: its crc no longer matches
    seg.write_bytes(bytes(data))
    assert list(IngestLog(tmp_path).replay(0)) == msgs[:1]
