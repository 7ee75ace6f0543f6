"""The ledger on PostgreSQL, shared by cloud replicas that may run on different machines.

Tensors live in the database (``bytea`` holding the safetensors bytes), not in files: every replica reads the
same state through one connection string, and a row and its tensors are written by one transaction, so the
sqlite backend's two-phase ordering (file, fsync, then row; orphan sweep at open) is not needed at all: an
``accept`` that returns was committed with its tensors (PostgreSQL's ``synchronous_commit`` flushes the WAL
before the commit returns), and ``commit_global`` writes the global, its optimizer state and the
pending-to-applied flips in one transaction.  A shared file store would need its own durability, cleanup and
credentials on every replica, for adapters of kilobytes to a few megabytes that ``bytea`` (TOAST, stored
uncompressed: float noise does not compress) carries well.

Fencing: a ledger opened with ``epoch`` checks, inside every write transaction, that the lease row still holds
that epoch (``SELECT ... FOR SHARE``).  A replica that takes over bumps the epoch with an ``UPDATE`` that waits for
those share locks, so a deposed replica's write either committed before the takeover (and the new leader
reads it) or fails with :class:`LeaseLost` and changes nothing.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import psycopg
from safetensors.numpy import load as st_load

from .contribution import Contribution, GlobalState
from .errors import DuplicateUpdate
from .ledger_base import (
    LOAD_COLUMNS,
    UPDATE_COLUMNS,
    DocStore,
    LeaseLost,
    PendingUpdate,
    VersionConflict,
    pending_from_row,
    steps_json,
    tensor_bytes,
    update_values,
)

#: the lease row every replica of one cloud contends for (one database per cloud)
LEASE_NAME = "cloud"
#: advisory lock that serialises schema creation when several replicas start at once
_SCHEMA_LOCK = 0x6D65676163650001

SCHEMA = """
CREATE TABLE IF NOT EXISTS updates (
    id BIGSERIAL PRIMARY KEY,
    edge_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    base_version BIGINT NOT NULL,
    received_version BIGINT NOT NULL,
    rank INTEGER NOT NULL,
    alpha DOUBLE PRECISION NOT NULL,
    samples BIGINT NOT NULL,
    modalities TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    weight DOUBLE PRECISION NOT NULL,
    norm DOUBLE PRECISION,
    tensors BYTEA,
    status TEXT NOT NULL CHECK (status IN ('pending', 'applied')),
    applied_version BIGINT,
    received_at DOUBLE PRECISION NOT NULL,
    digest TEXT,
    steps TEXT,
    UNIQUE (edge_id, seq)
);
ALTER TABLE updates ALTER COLUMN tensors SET STORAGE EXTERNAL;
CREATE INDEX IF NOT EXISTS updates_status ON updates (status);
CREATE INDEX IF NOT EXISTS updates_digest ON updates (edge_id, digest);
CREATE INDEX IF NOT EXISTS updates_applied ON updates (applied_version);
CREATE TABLE IF NOT EXISTS rejections (
    id BIGSERIAL PRIMARY KEY,
    edge_id TEXT NOT NULL,
    seq BIGINT,
    base_version BIGINT,
    received_version BIGINT,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    at DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS globals (
    version BIGINT PRIMARY KEY,
    strategy TEXT NOT NULL,
    tensors BYTEA,
    opt BYTEA,
    n_updates INTEGER NOT NULL,
    meta TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);
ALTER TABLE globals ALTER COLUMN tensors SET STORAGE EXTERNAL;
CREATE TABLE IF NOT EXISTS docs (name TEXT PRIMARY KEY, body BYTEA NOT NULL);
CREATE TABLE IF NOT EXISTS lease (
    name TEXT PRIMARY KEY,
    epoch BIGINT NOT NULL,
    holder TEXT,
    since TIMESTAMPTZ
);
"""


def connect(url: str, **kw: Any) -> psycopg.Connection[Any]:
    """An autocommit connection that notices a dead peer within seconds, on either side (TCP keepalives while
    idle, ``tcp_user_timeout`` while sending), and never leaves an abandoned transaction holding the lease row's
    lock for long."""
    return psycopg.connect(
        url, autocommit=True, connect_timeout=10, keepalives=1, keepalives_idle=5, keepalives_interval=2,
        keepalives_count=3, tcp_user_timeout=10000,
        options="-c tcp_keepalives_idle=5 -c tcp_keepalives_interval=2 -c tcp_keepalives_count=3"
                " -c tcp_user_timeout=10000 -c idle_in_transaction_session_timeout=30000",
        **kw,
    )


def ensure_schema(conn: psycopg.Connection[Any]) -> None:
    """Create the tables once (replicas starting together serialise on an advisory lock) and the lease row.
    An existing schema is left alone: its DDL would lock tables the leader is using."""
    row = conn.execute("SELECT to_regclass('lease') IS NOT NULL").fetchone()
    if not (row and row[0]):
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            conn.execute(SCHEMA)
    conn.execute("INSERT INTO lease (name, epoch) VALUES (%s, 0) ON CONFLICT DO NOTHING", (LEASE_NAME,))


def _load(blob: bytes | memoryview | None) -> dict[str, np.ndarray]:
    if blob is None:
        raise FileNotFoundError("tensors pruned")
    return st_load(bytes(blob))


class PgLedger(DocStore):
    """See the module docstring.  ``epoch=None`` opens it unfenced (audits, tests, a single writer)."""

    def __init__(self, url: str, *, epoch: int | None = None) -> None:
        self.url = url
        self.epoch = epoch
        self._lock = threading.Lock()
        try:
            self._db = connect(url)
            ensure_schema(self._db)
        except psycopg.OperationalError as e:
            raise LeaseLost(f"ledger database unreachable: {e}") from e

    @property
    def docs(self) -> DocStore:
        return self

    # ---- lifecycle -----------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> PgLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[psycopg.Connection[Any]]:
        """One fenced write transaction (see the module docstring); a broken connection means lost too."""
        with self._lock:
            try:
                with self._db.transaction():
                    if self.epoch is not None:
                        row = self._db.execute("SELECT epoch FROM lease WHERE name=%s FOR SHARE",
                                               (LEASE_NAME,)).fetchone()
                        if row is None or int(row[0]) != self.epoch:
                            raise LeaseLost(f"lease epoch is {row and row[0]}, this replica holds {self.epoch}")
                    yield self._db
            except psycopg.OperationalError as e:
                raise LeaseLost(f"ledger database connection lost: {e}") from e

    def check_lease(self) -> None:
        """Raise :class:`LeaseLost` unless this replica still holds the lease (an empty fenced transaction): the
        service checks before it announces anything on a (re)connect, so a deposed replica that has not noticed
        yet cannot re-publish an older retained global over the new leader's."""
        with self._write():
            pass

    def _one(self, q: str, args: tuple[object, ...] = ()) -> Any:
        rows = self._all(q, args)
        return rows[0] if rows else None

    def _all(self, q: str, args: tuple[object, ...] = ()) -> list[Any]:
        with self._lock:
            try:
                return self._db.execute(q, args).fetchall()  # type: ignore[arg-type]
            except psycopg.OperationalError as e:
                raise LeaseLost(f"ledger database connection lost: {e}") from e

    # ---- documents ---------------------------------------------------------------------
    def read_doc(self, name: str) -> bytes | None:
        row = self._one("SELECT body FROM docs WHERE name=%s", (name,))
        return None if row is None else bytes(row[0])

    def write_doc(self, name: str, body: bytes) -> None:
        with self._write() as db:
            db.execute("INSERT INTO docs (name, body) VALUES (%s, %s)"
                       " ON CONFLICT (name) DO UPDATE SET body = EXCLUDED.body", (name, body))

    # ---- dedup ----------------------------------------------------------------------------
    def seen(self, edge_id: str, seq: int) -> bool:
        return self._one("SELECT 1 FROM updates WHERE edge_id=%s AND seq=%s", (edge_id, seq)) is not None

    def seen_content(self, edge_id: str, digest: str) -> bool:
        return self._one("SELECT 1 FROM updates WHERE edge_id=%s AND digest=%s", (edge_id, digest)) is not None

    def last_seq(self, edge_id: str) -> int | None:
        row = self._one("SELECT MAX(seq) FROM updates WHERE edge_id=%s", (edge_id,))
        return None if row[0] is None else int(row[0])

    # ---- updates -------------------------------------------------------------------------
    def accept(
        self, c: Contribution, received_version: int, weight: float, norm: float | None = None,
        digest: str | None = None, steps: dict[str, float] | None = None,
    ) -> int:
        """Persist an accepted update with its tensors, in one committed transaction; returns its id."""
        blob = tensor_bytes(c.tensors, {"edge_id": c.edge_id, "seq": str(c.seq)})
        cols = ", ".join(UPDATE_COLUMNS)
        try:
            with self._write() as db:
                row = db.execute(
                    f"INSERT INTO updates ({cols}, tensors, status, received_at, digest, steps)"
                    f" VALUES ({', '.join(['%s'] * len(UPDATE_COLUMNS))}, %s, 'pending', %s, %s, %s) RETURNING id",
                    (*update_values(c, received_version, weight, norm), blob, time.time(), digest,
                     steps_json(steps)),
                ).fetchone()
        except psycopg.errors.UniqueViolation as e:
            raise DuplicateUpdate(f"{c.edge_id}#{c.seq}") from e  # the first copy wins
        return int(row[0])

    def reject(self, edge_id: str, seq: int | None, reason: str, detail: str = "",
               base_version: int | None = None, received_version: int | None = None) -> None:
        """Record a refusal for an audit (the service no longer calls it; kept for parity and old rows)."""
        with self._write() as db:
            db.execute("INSERT INTO rejections (edge_id, seq, base_version, received_version, reason, detail, at)"
                       " VALUES (%s,%s,%s,%s,%s,%s,%s)",
                       (edge_id, seq, base_version, received_version, reason, detail, time.time()))

    def rejections(self) -> list[tuple[str, int | None, str]]:
        return [(str(e), None if s is None else int(s), str(r))
                for e, s, r in self._all("SELECT edge_id, seq, reason FROM rejections ORDER BY id")]

    def accepted_seqs(self, edge_id: str, limit: int = 32) -> list[int]:
        rows = self._all("SELECT seq FROM updates WHERE edge_id=%s ORDER BY seq DESC LIMIT %s", (edge_id, int(limit)))
        return sorted(int(r[0]) for r in rows)

    def recent_norms(self, limit: int) -> list[float]:
        rows = self._all("SELECT norm FROM updates WHERE norm IS NOT NULL ORDER BY id DESC LIMIT %s", (int(limit),))
        return [float(r[0]) for r in reversed(rows)]

    def recent_steps(self, limit: int) -> list[dict[str, float]]:
        rows = self._all("SELECT steps FROM updates WHERE steps IS NOT NULL ORDER BY id DESC LIMIT %s", (int(limit),))
        return [{str(k): float(v) for k, v in json.loads(r[0]).items()} for r in reversed(rows)]

    def counts(self) -> tuple[int, dict[str, int]]:
        accepted = int(self._one("SELECT COUNT(*) FROM updates")[0])
        rejected = self._all("SELECT reason, COUNT(*) FROM rejections GROUP BY reason")
        return accepted, {str(k): int(v) for k, v in rejected}

    def applied_in(self, version: int) -> list[tuple[str, int]]:
        rows = self._all("SELECT edge_id, seq FROM updates WHERE applied_version=%s ORDER BY id", (int(version),))
        return [(str(e), int(s)) for e, s in rows]

    def pending_count(self) -> int:
        return int(self._one("SELECT COUNT(*) FROM updates WHERE status='pending'")[0])

    def pending(self, limit: int | None = None) -> list[PendingUpdate]:
        """Accepted-but-unapplied updates in arrival order, tensors loaded."""
        return self._load_updates("status='pending' ORDER BY id LIMIT %s", (limit,))

    def applied_updates(self, version: int) -> list[PendingUpdate]:
        return self._load_updates("applied_version=%s ORDER BY id", (int(version),))

    def _load_updates(self, where: str, args: tuple[object, ...]) -> list[PendingUpdate]:
        rows = self._all(f"SELECT {LOAD_COLUMNS}, tensors FROM updates WHERE {where}", args)
        return [pending_from_row(r, _load(r[11])) for r in rows]

    # ---- globals -------------------------------------------------------------------------
    def latest_version(self) -> int | None:
        row = self._one("SELECT MAX(version) FROM globals")
        return None if row[0] is None else int(row[0])

    def commit_global(
        self, g: GlobalState, applied: Iterable[int], server_state: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Publish ``g`` as the next version and mark ``applied`` update ids as consumed, in one transaction."""
        ids = sorted(set(applied))
        blob = tensor_bytes(g.tensors, {"strategy": g.strategy})
        opt = tensor_bytes(server_state) if server_state else None
        try:
            with self._write() as db:
                latest = db.execute("SELECT MAX(version) FROM globals").fetchone()[0]  # type: ignore[index]
                if latest is not None and g.version != latest + 1:
                    raise VersionConflict(f"version {g.version} after {latest}")
                db.execute(
                    "INSERT INTO globals (version, strategy, tensors, opt, n_updates, meta, created_at)"
                    " VALUES (%s,%s,%s,%s,%s,%s,%s)",
                    (g.version, g.strategy, blob, opt, len(ids), json.dumps(g.meta, default=str), time.time()),
                )
                changed = db.execute(
                    "UPDATE updates SET status='applied', applied_version=%s WHERE status='pending' AND id = ANY(%s)",
                    (g.version, ids),
                ).rowcount
                if changed != len(ids):
                    raise VersionConflict(f"{len(ids) - changed} of the updates are not pending")
        except psycopg.errors.UniqueViolation as e:  # an unfenced second writer inserted the version first
            raise VersionConflict(f"version {g.version} exists") from e

    def latest_global(self) -> GlobalState | None:
        v = self.latest_version()
        return None if v is None else self.load_global(v)

    def load_global(self, version: int) -> GlobalState:
        row = self._one("SELECT strategy, tensors, meta FROM globals WHERE version=%s", (int(version),))
        if row is None:
            raise KeyError(version)
        return GlobalState(version=version, tensors=_load(row[1]), strategy=row[0], meta=json.loads(row[2]))

    def server_state(self, version: int | None = None) -> dict[str, np.ndarray]:
        version = self.latest_version() if version is None else version
        if version is None:
            return {}
        row = self._one("SELECT opt FROM globals WHERE version=%s", (int(version),))
        return st_load(bytes(row[0])) if row and row[0] is not None else {}

    def prune(self, keep_globals: int = 3) -> int:
        """Drop tensors of applied updates and of all but the last ``keep_globals`` versions (rows stay)."""
        with self._write() as db:
            removed = db.execute("UPDATE updates SET tensors=NULL WHERE status='applied' AND tensors IS NOT NULL"
                                 ).rowcount
            removed += db.execute(
                "UPDATE globals SET tensors=NULL, opt=NULL WHERE tensors IS NOT NULL AND version NOT IN"
                " (SELECT version FROM globals ORDER BY version DESC LIMIT %s)", (int(keep_globals),),
            ).rowcount
        return removed
