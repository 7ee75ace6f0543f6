"""The on-disk outbox against a plain list model: order, bounds, overflow policies, restarts, sequence blocks."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from device_sdk.store import DiskQueue, Overflow, QueueFullError

Row = tuple[int, str, bytes]  # (seq, topic, payload): what a caller put in


class OutboxModel(RuleBasedStateMachine):
    """Every operation is applied to a DiskQueue and to a list; the two must always agree.

    The model is written from the documented contract, not from the code: FIFO order, ``prepend``
    puts rows before everything, a full queue applies its policy to an append (drop-oldest removes the
    head, drop-newest refuses the row, error raises and changes nothing), rows and sequence reservations
    survive reopening the file, and ``dropped`` counts drops since this process opened the queue.
    """

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="megace-outbox-"))
        self.path = self.dir / "q.sqlite"
        self.rows: list[Row] = []
        self.dropped = 0
        self.next_seq = 0  # first sequence number a reservation must hand out
        self.counter = 0  # makes every appended row distinct

    @initialize(max_records=st.integers(1, 6), overflow=st.sampled_from(list(Overflow)))
    def open(self, max_records: int, overflow: Overflow) -> None:
        self.max_records, self.overflow = max_records, overflow
        self.q = DiskQueue(self.path, max_records=max_records, overflow=overflow.value)

    def _row(self) -> Row:
        self.counter += 1
        return (self.counter, f"t/{self.counter % 3}", b"p" * (self.counter % 5) + bytes([self.counter % 256]))

    @rule()
    def append(self) -> None:
        row = self._row()
        if len(self.rows) >= self.max_records and self.overflow is Overflow.ERROR:
            with pytest.raises(QueueFullError):
                self.q.append(*row)
            return
        kept = self.q.append(*row)
        if len(self.rows) >= self.max_records:
            self.dropped += 1
            if self.overflow is Overflow.DROP_NEWEST:
                assert kept is False
                return
            self.rows.pop(0)
        assert kept is True
        self.rows.append(row)

    @rule(n=st.integers(0, 3))
    def prepend(self, n: int) -> None:
        """Un-acked records of a lost connection go back in front; the bound does not refuse them."""
        rows = [self._row() for _ in range(n)]
        self.q.prepend(rows)
        self.rows[:0] = rows

    @rule(limit=st.integers(0, 8), data=st.data())
    def peek(self, limit: int, data: st.DataObject) -> None:
        everything = self.q.peek(None, 1000)
        ids = [r[0] for r in everything]
        assert ids == sorted(set(ids))
        assert [r[1:] for r in self.q.peek(None, limit)] == self.rows[:limit]
        if everything:
            k = data.draw(st.integers(0, len(everything) - 1))
            after = self.q.peek(ids[k], limit)
            assert [r[1:] for r in after] == self.rows[k + 1:k + 1 + limit]

    @precondition(lambda self: bool(self.rows))
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        """An acknowledged row leaves the queue wherever it is; deleting it again changes nothing."""
        ids = [r[0] for r in self.q.peek(None, 1000)]
        k = data.draw(st.integers(0, len(ids) - 1))
        self.q.delete(ids[k])
        self.rows.pop(k)
        self.q.delete(ids[k])

    @rule(block=st.integers(1, 2000))
    def reserve(self, block: int) -> None:
        start, end = self.q.reserve_seq(block)
        assert (start, end) == (self.next_seq, self.next_seq + block)
        self.next_seq = end

    @rule()
    def reopen(self) -> None:
        """A reboot: same file, fresh process state."""
        self.q.close()
        self.q = DiskQueue(self.path, max_records=self.max_records, overflow=self.overflow)
        self.dropped = 0

    @invariant()
    def agrees(self) -> None:
        if hasattr(self, "q"):
            assert len(self.q) == len(self.rows)
            assert self.q.dropped == self.dropped
            assert [r[1:] for r in self.q.peek(None, 1000)] == self.rows

    def teardown(self) -> None:
        if hasattr(self, "q"):
            self.q.close()
        shutil.rmtree(self.dir, ignore_errors=True)


OutboxModel.TestCase.settings = settings(max_examples=60, stateful_step_count=25, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])
test_outbox_matches_its_model = OutboxModel.TestCase


def test_default_sequence_block_and_file_layout(tmp_path: Path) -> None:
    """Blocks of 1000 by default; the queue's folder is created; a policy name is accepted as text."""
    q = DiskQueue(tmp_path / "new" / "dir" / "q.sqlite", overflow="drop-newest")
    try:
        assert q.overflow is Overflow.DROP_NEWEST and q.max_records == 100_000
        assert q.reserve_seq() == (0, 1000)
        assert q.reserve_seq() == (1000, 2000)
    finally:
        q.close()
    with pytest.raises(ValueError):
        DiskQueue(tmp_path / "x.sqlite", overflow="drop-some")
