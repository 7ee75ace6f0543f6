"""The agent's reader of the receiver's log (:class:`LogTail`) on real files: frames as they are written,
a half-written frame left for later, a torn tail skipped only once a later segment exists, exact resume
from a checkpointed position, and old segments dropped."""

from __future__ import annotations

from pathlib import Path

from edge_agent.ingestlog import IngestLog, segment_path
from edge_agent.logtail import LogTail


def _write(log: IngestLog, names: list[str]) -> None:
    for name in names:
        log.append(f"t/{name}", name.encode(), name.endswith("r"))
    log.commit()


def test_frames_are_read_as_they_are_committed_and_a_partial_frame_waits(tmp_path: Path) -> None:
    log = IngestLog(tmp_path)
    tail = LogTail(tmp_path, log.segment, 0)
    assert tail.read(100) == []
    _write(log, ["a", "b"])
    assert tail.read(100) == [("t/a", b"a", False), ("t/b", b"b", False)]
    # a frame of which only the first bytes reached the file: not returned, not skipped
    log.append("t/c", b"c" * 100)
    with log._lock:
        segment, frame = log._pending.pop()
    path = segment_path(tmp_path, segment)
    with path.open("ab") as f:
        f.write(frame[:20])
    assert tail.read(100) == []
    with path.open("ab") as f:
        f.write(frame[20:])
    assert tail.read(100) == [("t/c", b"c" * 100, False)]
    assert tail.position == (segment, path.stat().st_size) and tail.torn == 0


def test_limit_and_exact_resume_from_a_position(tmp_path: Path) -> None:
    log = IngestLog(tmp_path)
    _write(log, [f"m{i}" for i in range(10)])
    tail = LogTail(tmp_path, log.segment, 0)
    first = tail.read(4)
    assert [p for _, p, _ in first] == [b"m0", b"m1", b"m2", b"m3"]
    resumed = LogTail(tmp_path, *tail.position)  # what a checkpoint records, read back after a restart
    assert [p for _, p, _ in resumed.read(100)] == [f"m{i}".encode() for i in range(4, 10)]
    assert [p for _, p, _ in tail.read(100)] == [f"m{i}".encode() for i in range(4, 10)]


def test_a_torn_tail_is_skipped_only_when_a_later_segment_exists(tmp_path: Path) -> None:
    log = IngestLog(tmp_path)
    _write(log, ["x"])
    first = log.segment
    with segment_path(tmp_path, first).open("ab") as f:
        f.write(b"\x40\x00\x00\x00garbage")  # a receiver killed mid-write
    tail = LogTail(tmp_path, first, 0)
    assert [p for _, p, _ in tail.read(100)] == [b"x"]
    assert tail.read(100) == [] and tail.torn == 0  # the writer may still finish it
    restarted = IngestLog(tmp_path)  # a restarted receiver starts a new segment
    assert restarted.segment == first + 1
    _write(restarted, ["y", "zr"])
    assert tail.read(100) == [("t/y", b"y", False), ("t/zr", b"zr", True)]
    assert tail.torn == 1 and tail.position[0] == first + 1


def test_drop_before_keeps_the_segment_being_read(tmp_path: Path) -> None:
    log = IngestLog(tmp_path)
    for name in ("a", "b", "c"):
        _write(log, [name])
        log.mark()
    tail = LogTail(tmp_path, 1, 0)
    assert len(tail.read(2)) == 2  # in segment 2 now
    assert tail.drop_before(3) == 1  # segment 1 only: 2 is still being read
    assert sorted(p.name for p in tmp_path.glob("seg-*.log")) == ["seg-00000002.log", "seg-00000003.log"]
    assert [p for _, p, _ in tail.read(10)] == [b"c"]


def test_advance_to_keeps_new_frames_at_or_after_the_replay_start(tmp_path: Path) -> None:
    # a clean stop checkpoints "replay from segment 5", which no file holds yet: new frames must not go to seg 1
    log = IngestLog(tmp_path)
    log.advance_to(5)
    _write(log, ["after-restart"])
    assert [p for _, p, _ in IngestLog(tmp_path).replay(5)] == [b"after-restart"]
