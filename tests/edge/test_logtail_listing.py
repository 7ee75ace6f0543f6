"""The log tail lists the directory only when it changed, and never misses a segment because of that.

Why: the agent's reader reaches the end of the data hundreds of times a second under load, and each time it
looked for a later segment with a glob. It now trusts a listing while the directory's mtime is unchanged, but
only a listing taken once that mtime was settled (file systems stamp mtimes at a coarse tick, so a segment
created within the tick of a listing can leave the mtime as it was). Real files; mtimes set with ``os.utime``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

import edge_agent.logtail
from edge_agent.ingestlog import IngestLog
from edge_agent.logtail import SETTLED_NS, LogTail


def _age(directory: Path, seconds: float) -> int:
    """Stamp ``directory``'s mtime ``seconds`` in the past; returns it."""
    ns = time.time_ns() - int(seconds * 1e9)
    os.utime(directory, ns=(ns, ns))
    return ns


def _count_listings(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = edge_agent.logtail.list_segments

    def counting(directory: Path) -> list[int]:
        calls.append(1)
        return real(directory)

    monkeypatch.setattr(edge_agent.logtail, "list_segments", counting)
    return calls


def test_a_settled_directory_is_listed_once_and_a_new_segment_is_still_found(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_listings(monkeypatch)
    log = IngestLog(tmp_path)
    log.append("t/a", b"a")
    log.commit()
    _age(tmp_path, 2 * SETTLED_NS / 1e9)
    tail = LogTail(tmp_path, log.segment, 0)
    assert [p for _, p, _ in tail.read(10)] == [b"a"]
    for _ in range(20):
        assert tail.read(10) == []
    assert len(calls) == 1  # one listing for 21 reads that reached the end
    log.mark()
    log.append("t/b", b"b")
    log.commit()  # a new segment: the directory's mtime moves on
    assert [p for _, p, _ in tail.read(10)] == [b"b"]
    assert tail.position[0] == log.segment


def test_a_listing_taken_while_the_mtime_is_fresh_is_not_trusted(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_listings(monkeypatch)
    log = IngestLog(tmp_path)
    log.append("t/a", b"a")
    log.commit()
    stamp = _age(tmp_path, 0.001)  # as fresh as a listing just after a segment was created
    tail = LogTail(tmp_path, log.segment, 0)
    assert [p for _, p, _ in tail.read(10)] == [b"a"]
    log.mark()
    log.append("t/b", b"b")
    log.commit()
    os.utime(tmp_path, ns=(stamp, stamp))  # the new segment landed within the same coarse tick
    assert [p for _, p, _ in tail.read(10)] == [b"b"]
    assert len(calls) >= 2
