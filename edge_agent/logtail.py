"""Reading the ingest log while a receiver process writes it: the agent's side of the split ingest.

The receiver (:mod:`edge_agent.receiver`) appends frames to the newest segment and acknowledges them
to the broker; :class:`LogTail` reads them in order from a position ``(segment, offset)`` (the byte
after the last frame consumed), which the agent's checkpoint records, so a restart resumes exactly
where the checkpointed state ends.

A segment is final once a later one exists (the receiver closes a segment before opening the next,
and a restarted receiver always starts a new one): whatever incomplete bytes remain at its end are a
frame torn by a crash, never acknowledged (the broker delivers that message again), and are skipped.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import IO

from edge_agent.ingestlog import list_segments, read_frames, segment_path

log = logging.getLogger(__name__)

CHUNK = 4 * 1024 * 1024
"""Bytes read from a segment at a time."""
SETTLED_NS = 2_000_000_000
"""A directory mtime this old is trusted to show every segment created before it (file systems stamp
mtimes at a coarse tick, so a segment made within the tick of a listing may leave the mtime unchanged)."""


class LogTail:
    """Frames of the ingest log in ``directory`` after ``(segment, offset)``, as the log grows."""

    def __init__(self, directory: str | Path, segment: int = 0, offset: int = 0) -> None:
        self.directory = Path(directory)
        self.segment = segment
        self.offset = offset
        """Byte after the last frame returned, in :attr:`segment`."""
        self.torn = 0
        """Torn tails skipped (a receiver killed mid-write)."""
        self._file: IO[bytes] | None = None
        self._data = b""
        self._pos = 0  # in _data; _data[0] is byte ``offset - _pos`` of the segment
        self._listed_mtime = -1  # the directory's mtime when a listing last found no later segment

    @property
    def position(self) -> tuple[int, int]:
        return self.segment, self.offset

    def read(self, limit: int) -> list[tuple[str, bytes, bool]]:
        """Up to ``limit`` frames ``(topic, payload, retained)`` after the position, which advances past them."""
        out: list[tuple[str, bytes, bool]] = []
        while True:
            if self._pos < len(self._data):
                for topic, payload, retained, end in read_frames(self._data, self._pos):
                    out.append((topic, payload, retained))
                    self.offset += end - self._pos
                    self._pos = end
                    if len(out) >= limit:
                        return out
            if self._more():
                continue
            following = self._next_segment()
            if following is None:
                return out
            if self._more():  # bytes written before the receiver moved on
                continue
            rest = len(self._data) - self._pos
            if rest:
                self.torn += 1
                log.warning("ingest log segment %d: %d bytes of a torn frame at byte %d skipped", self.segment,
                            rest, self.offset)
            self._switch(following)

    def _more(self) -> bool:
        """Read what the segment gained; False when nothing was added."""
        if self._file is None:
            path = segment_path(self.directory, self.segment)
            try:
                self._file = path.open("rb")
            except FileNotFoundError:
                return False
            self._file.seek(self.offset)
            self._data, self._pos = b"", 0
        chunk = self._file.read(CHUNK)
        if not chunk:
            return False
        self._data = self._data[self._pos:] + chunk
        self._pos = 0
        return True

    def _next_segment(self) -> int | None:
        """The first segment after the current one, if any: listed only when the directory changed, since
        the reader asks each time it reaches the end of the data (hundreds of times a second under load)."""
        try:
            mtime = os.stat(self.directory).st_mtime_ns
        except FileNotFoundError:
            return None
        if mtime == self._listed_mtime:
            return None
        settled = time.time_ns() - mtime > SETTLED_NS  # else a segment made later in this tick keeps this mtime
        later = [n for n in list_segments(self.directory) if n > self.segment]
        self._listed_mtime = mtime if settled and not later else -1
        return min(later) if later else None

    def _switch(self, segment: int) -> None:
        self.close()
        self.segment, self.offset = segment, 0
        self._data, self._pos = b"", 0

    def drop_before(self, segment: int) -> int:
        """Delete segments older than ``segment`` (a committed checkpoint covers them); returns how many."""
        dropped = 0
        for n in list_segments(self.directory):
            if n < min(segment, self.segment):
                segment_path(self.directory, n).unlink(missing_ok=True)
                dropped += 1
        return dropped

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
