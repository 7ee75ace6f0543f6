"""Leader election for cloud replicas on one PostgreSQL ledger: exactly one active, the others standing by.

Technique: a session-level advisory lock (``pg_try_advisory_lock``) held on a dedicated connection, plus a
fencing epoch in the ``lease`` row.

* The lock lives exactly as long as the holder's database session.  A holder killed with SIGKILL loses its
  socket, PostgreSQL ends the session and frees the lock at once: a standby polling every ``poll_s`` takes
  over within a second, with no lease timeout to wait out and no clocks to trust.  A holder cut off by the
  network is found dead by TCP keepalives (set on both ends in ``ledger_pg.connect``), within seconds.
* The lock alone cannot stop a deposed holder that does not know it yet (a paused process, a half-open
  socket) from writing through its *other* connection, the ledger's.  So the new holder bumps ``lease.epoch``
  before it serves, and every ledger write checks the epoch inside its own transaction (``FOR SHARE`` on the
  lease row, see ``ledger_pg``): the bump waits for writes in flight, and every later write of the deposed
  replica fails with :class:`~cloud_aggregator.ledger_base.LeaseLost`.  Nothing is published before it is
  committed, so a deposed replica cannot publish a version that forks the history.
* The holder re-checks its lease every ``heartbeat_s`` (its session alive and the epoch its own); when
  either fails, :attr:`Lease.lost` is set and the service stops its MQTT session at once.

Why not a lease row with an expiry: it works without the lock, but a SIGKILLed leader is replaced only after
the expiry (seconds, set against clock skew and pauses), while the lock is released the moment the session
ends; the epoch gives the same fencing either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from typing import Any

import psycopg

from .ledger_base import LeaseLost
from .ledger_pg import LEASE_NAME, connect, ensure_schema

log = logging.getLogger(__name__)

#: the advisory lock key of the lease (advisory locks are per database, and a cloud has one database)
LEASE_LOCK = 0x6D65676163650002


def holder_name(cloud_id: str) -> str:
    """Who holds the lease, for operators reading the ``lease`` row."""
    return f"{cloud_id}@{socket.gethostname()}:{os.getpid()}"


class Lease:
    """``await lease.acquire(stop)`` blocks (standby) until this replica is the leader; see the module docstring."""

    def __init__(self, url: str, holder: str, *, poll_s: float = 0.5, heartbeat_s: float = 1.0) -> None:
        self.url = url
        self.holder = holder
        self.poll_s = poll_s
        self.heartbeat_s = heartbeat_s
        self.epoch: int | None = None
        #: set when the lease is lost while held (the service stops serving at once)
        self.lost = asyncio.Event()
        self._conn: psycopg.Connection[Any] | None = None

    # ---- blocking parts (run in a thread) -----------------------------------------------------
    def _try_once(self) -> int | None:
        """One attempt: connect if needed, take the lock if free, then bump the epoch; the new epoch or None."""
        if self._conn is None or self._conn.closed:
            self._conn = connect(self.url)
            ensure_schema(self._conn)
        got = self._conn.execute("SELECT pg_try_advisory_lock(%s)", (LEASE_LOCK,)).fetchone()
        if not (got and got[0]):
            return None
        # waits for any write of the previous holder still in flight (they hold the row FOR SHARE)
        row = self._conn.execute(
            "UPDATE lease SET epoch = epoch + 1, holder = %s, since = now() WHERE name = %s RETURNING epoch",
            (self.holder, LEASE_NAME),
        ).fetchone()
        assert row is not None  # ensure_schema inserted the row
        return int(row[0])

    def _check(self) -> None:
        """Raise :class:`LeaseLost` unless the session is alive and the epoch is still ours."""
        if self._conn is None or self._conn.closed:
            raise LeaseLost("lease connection closed")
        try:
            row = self._conn.execute("SELECT epoch FROM lease WHERE name = %s", (LEASE_NAME,)).fetchone()
        except psycopg.Error as e:
            raise LeaseLost(f"lease connection lost: {e}") from e
        if row is None or int(row[0]) != self.epoch:
            raise LeaseLost(f"lease taken over (epoch {row and row[0]}, ours {self.epoch})")

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.closed:
            with contextlib.suppress(psycopg.Error):
                conn.execute("SELECT pg_advisory_unlock_all()")
            conn.close()

    # ---- asyncio API ------------------------------------------------------------------------
    async def acquire(self, stop: asyncio.Event) -> bool:
        """Stand by until the lease is ours (True) or ``stop`` is set (False).  The database being down is
        waited out: a standby keeps trying every ``poll_s``."""
        self.lost.clear()
        while not stop.is_set():
            try:
                epoch = await asyncio.to_thread(self._try_once)
            except psycopg.Error as e:
                log.warning("lease: database unavailable (%s); retrying", str(e).strip()[:200])
                await asyncio.to_thread(self._close)
                epoch = None
            if epoch is not None:
                self.epoch = epoch
                log.info("lease taken by %s (epoch %d)", self.holder, epoch)
                return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.poll_s)
        return False

    async def watch(self) -> None:
        """While held: re-check every ``heartbeat_s``; on failure set :attr:`lost` and return."""
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                await asyncio.wait_for(asyncio.to_thread(self._check), max(5.0, 5 * self.heartbeat_s))
            except (LeaseLost, TimeoutError) as e:
                log.error("lease lost: %s", e or "heartbeat timed out")
                self.lost.set()
                return

    async def release(self) -> None:
        """Give the lease up (unlock, close): a standby takes it within ``poll_s``."""
        self.epoch = None
        await asyncio.to_thread(self._close)
