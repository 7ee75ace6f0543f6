"""The ingest log: every device message that changed the edge's state since its last checkpoint, on disk
before the broker hears that the edge has it.

Why: the broker forgets a QoS 1 message once the subscriber acknowledges it. The edge therefore
acknowledges (manually, see :class:`broker.session.Session`) only after the message is in this log,
so a ``kill -9`` loses nothing: what was logged is replayed at start, what was not was never
acknowledged and the broker delivers it again.

Layout: ``state_dir/ingest/seg-<n>.log``, frames of ``u32 length | u32 crc32 | msgpack [topic, payload, retained]``
(little-endian). A checkpoint starts a new segment (:meth:`IngestLog.mark`); once the checkpoint has
committed, older segments are deleted (:meth:`IngestLog.drop_before`). A frame torn by a crash fails
its length or checksum: replay stops there, and a fresh segment is started after it.

Group commit: :meth:`append` only buffers (on the event loop); :meth:`commit` writes and fsyncs
everything buffered in one go (on an I/O thread), so one fsync covers every message that arrived
meanwhile.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import msgpack

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<II")
MAX_FRAME = 512 * 1024 * 1024


class IngestLog:
    """Append-only, segmented, checksummed log with group commit.

    Args:
        directory: Where segments live (created if missing).
        fsync: ``True`` (default) survives power loss; ``False`` only writes to the OS, which
            survives a crash or ``kill -9`` of the agent but not of the machine.
    """

    def __init__(self, directory: str | Path, *, fsync: bool = True) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self._lock = threading.Lock()
        self._packer = msgpack.Packer(use_bin_type=True)  # reused: append runs on one thread (the loop)
        self._pending: list[tuple[int, bytes]] = []
        existing = self.segments()
        self._segment = (existing[-1] + 1) if existing else 1
        self._file: IO[bytes] | None = None
        self._file_segment = 0
        self.sizes: dict[int, int] = {n: self._path(n).stat().st_size for n in existing}
        """Bytes on disk per segment (a receiver's back-pressure measures its reader's lag with it)."""
        self.frames_written = 0
        self.bytes_written = 0

    # -- the loop's side: cheap, no I/O -------------------------------------------------------

    @property
    def segment(self) -> int:
        """The segment new frames go to."""
        return self._segment

    def append(self, topic: str, payload: bytes, retained: bool = False) -> None:
        """Buffer one message; it is durable once a later :meth:`commit` returns."""
        body = self._packer.pack([topic, payload, retained])
        frame = _HEADER.pack(len(body), zlib.crc32(body)) + body
        with self._lock:
            self._pending.append((self._segment, frame))

    def advance_to(self, segment: int) -> None:
        """Write no frame below ``segment`` (the restored checkpoint's replay start; call before any append).

        After a clean shutdown the last checkpoint names a segment no file holds yet; without this, new
        frames went to ``seg-1`` (after the last existing file) and the next replay, which starts at that
        checkpoint's segment, skipped them."""
        with self._lock:
            self._segment = max(self._segment, segment)

    def mark(self) -> int:
        """Start a new segment for what follows (call when a checkpoint snapshot is taken); returns it.

        Everything appended before belongs to the snapshot; replay after that checkpoint starts here.
        """
        with self._lock:
            self._segment += 1
            return self._segment

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    # -- the I/O thread's side -------------------------------------------------------------

    def commit(self) -> int:
        """Write and (with ``fsync``) sync everything buffered; returns how many frames. Blocking."""
        with self._lock:
            batch, self._pending = self._pending, []
        if not batch:
            return 0
        i = 0
        while i < len(batch):
            segment = batch[i][0]
            j = i
            while j < len(batch) and batch[j][0] == segment:
                j += 1
            f = self._open(segment)
            data = b"".join(frame for _, frame in batch[i:j])
            f.write(data)
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())
            self.sizes[segment] = f.tell()
            self.frames_written += j - i
            self.bytes_written += len(data)
            i = j
        return len(batch)

    def _open(self, segment: int) -> IO[bytes]:
        if self._file is not None and self._file_segment == segment:
            return self._file
        if self._file is not None:
            self._file.close()
        path = self._path(segment)
        created = not path.exists()
        self._file = path.open("ab")
        self._file_segment = segment
        if created and self.fsync:
            fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(fd)  # the new file's directory entry must survive a power loss too
            finally:
                os.close(fd)
        return self._file

    def drop_before(self, segment: int) -> int:
        """Delete segments older than ``segment`` (their content is in a committed checkpoint)."""
        dropped = 0
        for n in self.segments():
            if n < segment:
                if self._file is not None and self._file_segment == n:
                    with self._lock:
                        self._file.close()
                        self._file = None
                self._path(n).unlink(missing_ok=True)
                self.sizes.pop(n, None)
                dropped += 1
        return dropped

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    # -- start-up ------------------------------------------------------------------------

    def segments(self) -> list[int]:
        return list_segments(self.directory)

    def replay(self, since: int, offset: int = 0) -> Iterator[tuple[str, bytes, bool]]:
        """Every intact ``(topic, payload, retained)`` from byte ``offset`` of segment ``since`` on, in order.

        A segment is read up to its first torn or corrupt frame. New frames always go to a segment
        after every existing one, never after a torn tail.
        """
        for n in self.segments():
            if n >= since:
                yield from self._frames(n, offset if n == since else 0)

    def _frames(self, n: int, start: int = 0) -> Iterator[tuple[str, bytes, bool]]:
        data = self._path(n).read_bytes()
        pos = start
        for topic, payload, retained, end in read_frames(data, start):
            yield topic, payload, retained
            pos = end
        if pos != len(data):
            # a torn tail (the crash hit mid-write): those messages were never acknowledged, the
            # broker delivers them again; the next segment (a later run's) is still replayed
            log.warning("ingest log %s: %d bytes of a torn frame at byte %d skipped", self._path(n),
                        len(data) - pos, pos)

    def _path(self, segment: int) -> Path:
        return segment_path(self.directory, segment)


def list_segments(directory: Path) -> list[int]:
    """The numbers of the log's segment files in ``directory``, ascending (other files are ignored)."""
    out = []
    for p in directory.glob("seg-*.log"):
        try:
            out.append(int(p.stem.removeprefix("seg-")))
        except ValueError:
            continue
    return sorted(out)


def segment_path(directory: Path, segment: int) -> Path:
    """Where segment ``segment`` of the log in ``directory`` lives."""
    return directory / f"seg-{segment:08d}.log"


def read_frames(data: bytes | memoryview, pos: int = 0) -> Iterator[tuple[str, bytes, bool, int]]:
    """Intact frames of ``data`` from byte ``pos``: ``(topic, payload, retained, end)``, ``end`` the byte after it.

    Stops at the first incomplete, torn or corrupt frame: a writer may be in the middle of it (a
    reader tailing the log), or a crash tore it (replay)."""
    size = len(data)
    unpackb = msgpack.unpackb
    while pos + _HEADER.size <= size:
        length, crc = _HEADER.unpack_from(data, pos)
        start = pos + _HEADER.size
        body = data[start: start + length]
        if length > MAX_FRAME or len(body) != length or zlib.crc32(body) != crc:
            return
        try:
            topic, payload, retained = unpackb(body, raw=False)
        except (ValueError, TypeError, msgpack.ExtraData):
            return
        if not isinstance(topic, str) or not isinstance(payload, bytes) or not isinstance(retained, bool):
            return
        pos = start + length
        yield topic, payload, retained, pos
