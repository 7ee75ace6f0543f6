"""The on-disk outbox behind store-and-forward: a bounded, ordered sqlite queue.

Records that cannot be published (broker unreachable, or older records still
waiting) are appended here and drained strictly in order once the broker is back.
When the bound is hit the policy is explicit and counted: ``drop-oldest`` (default),
``drop-newest``, or ``error`` (raise :class:`QueueFullError`).
"""

from __future__ import annotations

import os
import secrets
import sqlite3
from pathlib import Path

from broker.compat import StrEnum


def default_store_path(device: str) -> Path:
    """``$MEGACE_STATE_DIR/device/<device>.sqlite``, else under ``~/.local/state/megace``."""
    base = os.environ.get("MEGACE_STATE_DIR") or os.path.join(os.path.expanduser("~"), ".local", "state", "megace")
    return Path(base) / "device" / f"{device}.sqlite"


class Overflow(StrEnum):
    DROP_OLDEST = "drop-oldest"
    DROP_NEWEST = "drop-newest"
    ERROR = "error"


class QueueFullError(RuntimeError):
    """The outbox is full and its policy is ``error``."""


class DiskQueue:
    """FIFO of (topic, payload, seq) rows; not thread-safe (the client serialises access)."""

    def __init__(
        self, path: str | Path, *, max_records: int = 100_000, overflow: Overflow | str = Overflow.DROP_OLDEST
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_records = max_records
        self.overflow = Overflow(overflow)
        self.dropped = 0
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        # SQL text carries "pragma: no mutate": SQL is case-insensitive, so mutmut's case mutants are
        # equivalent, and its "XX...XX" mutants are syntax errors that every test catches.
        self._db.execute("PRAGMA journal_mode=WAL")  # pragma: no mutate
        self._db.execute("PRAGMA synchronous=NORMAL")  # pragma: no mutate
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS outbox"  # pragma: no mutate
            " (id INTEGER PRIMARY KEY, seq INTEGER, topic TEXT, payload BLOB)"  # pragma: no mutate
        )
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER)")  # pragma: no mutate
        self.count: int = self._db.execute(  # rows queued (the publish path reads it: no __len__ call)
            "SELECT COUNT(*) FROM outbox"  # pragma: no mutate
        ).fetchone()[0]

    def __len__(self) -> int:
        return self.count

    def append(self, seq: int, topic: str, payload: bytes) -> bool:
        """Add a row at the tail; returns False if the overflow policy dropped the new row."""
        if self.count >= self.max_records:
            if self.overflow is Overflow.ERROR:
                raise QueueFullError(f"outbox {self.path} holds {self.count} records (max {self.max_records})")
            if self.overflow is Overflow.DROP_NEWEST:
                self.dropped += 1
                return False
            self._db.execute("DELETE FROM outbox WHERE id = (SELECT MIN(id) FROM outbox)")  # pragma: no mutate
            self.count -= 1
            self.dropped += 1
        self._db.execute(
            "INSERT INTO outbox (seq, topic, payload) VALUES (?, ?, ?)",  # pragma: no mutate
            (seq, topic, payload),
        )
        self.count += 1
        return True

    def prepend(self, rows: list[tuple[int, str, bytes]]) -> None:
        """Put rows (in order) before everything queued: un-acked messages from a lost connection."""
        if not rows:
            return
        first = self._db.execute(
            "SELECT COALESCE(MIN(id), 1) FROM outbox"  # pragma: no mutate
        ).fetchone()[0]
        start = first - len(rows)
        with self._db:
            self._db.execute("BEGIN")  # pragma: no mutate
            self._db.executemany(
                "INSERT INTO outbox (id, seq, topic, payload) VALUES (?, ?, ?, ?)",  # pragma: no mutate
                [(start + i, s, t, p) for i, (s, t, p) in enumerate(rows)],
            )
        self.count += len(rows)

    def peek(self, after_id: int | None, limit: int) -> list[tuple[int, int, str, bytes]]:
        """Up to ``limit`` rows (id, seq, topic, payload) in order, starting after ``after_id``."""
        if after_id is None:
            cur = self._db.execute(
                "SELECT id, seq, topic, payload FROM outbox ORDER BY id LIMIT ?",  # pragma: no mutate
                (limit,),
            )
        else:
            cur = self._db.execute(
                "SELECT id, seq, topic, payload FROM outbox WHERE id > ? ORDER BY id LIMIT ?",  # pragma: no mutate
                (after_id, limit),
            )
        return cur.fetchall()

    def min_seq(self) -> int | None:
        """The lowest seq queued (re-sends may sit behind newer rows), None when empty (receipts' ``resend_from``)."""
        if not self.count:
            return None
        return self._db.execute("SELECT MIN(seq) FROM outbox").fetchone()[0]  # pragma: no mutate

    def delete(self, row_id: int) -> None:
        if self._db.execute(
            "DELETE FROM outbox WHERE id = ?",  # pragma: no mutate
            (row_id,),
        ).rowcount:
            self.count -= 1

    def reserve_seq(self, block: int = 1000) -> tuple[int, int]:
        """Reserve ``block`` sequence numbers that survive restarts; returns [start, end)."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")  # pragma: no mutate
            row = self._db.execute(
                "SELECT value FROM meta WHERE key = 'next_seq'"  # pragma: no mutate
            ).fetchone()
            start = row[0] if row else 0
            self._db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('next_seq', ?)",  # pragma: no mutate
                (start + block,),
            )
        return start, start + block

    def epoch(self) -> int:
        """A random id of this store, made once: registrations carry it, so an edge can tell a device whose
        seqs started over (a new store) from a re-sent or redelivered registration (same store)."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")  # pragma: no mutate
            row = self._db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()  # pragma: no mutate
            if row:
                return int(row[0])
            value = secrets.randbits(63) or 1
            self._db.execute("INSERT INTO meta (key, value) VALUES ('epoch', ?)", (value,))  # pragma: no mutate
            return value

    def close(self) -> None:
        self._db.close()
