"""Durable record of what the cloud accepted and published, so a crash loses and repeats nothing.

This is the embedded default (sqlite + files, one process); ``ledger_pg`` keeps the same record on PostgreSQL
for replicas, ``ledger_base`` the interface both implement, and :func:`open_ledger` picks by ``[ledger] url``.

Layout under ``root``::

    ledger.sqlite                       WAL, synchronous=FULL: updates, rejections, globals
    updates/<edge-hash>_<seq>_<rand>.safetensors  one accepted contribution
    globals/v<version>.safetensors          one global adapter (+ v<version>.opt.safetensors)

Ordering rules that make recovery exact:

* ``accept`` writes the tensors (tmp + fsync + rename + dir fsync) *before* the row is
  committed, and the caller acknowledges only after ``accept`` returns; an ack therefore
  always means "on disk".  A crash between the two leaves an orphan file, removed at open.
* ``commit_global`` writes the global file first, then in one transaction inserts the version
  and flips exactly the consumed updates from pending to applied (refusing any that are not
  pending).  A crash before that transaction leaves the previous version current and the
  updates pending, so re-aggregating after restart yields the same version number again.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from .contribution import Contribution, GlobalState
from .errors import DuplicateUpdate
from .ledger_base import DocStore, LedgerBackend, PendingUpdate, VersionConflict, save_tensors
from .ledger_base import chunks as _chunks

__all__ = ["Ledger", "PendingUpdate", "VersionConflict", "open_ledger", "save_tensors"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS updates (
    id INTEGER PRIMARY KEY,
    edge_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    base_version INTEGER NOT NULL,
    received_version INTEGER NOT NULL,
    rank INTEGER NOT NULL,
    alpha REAL NOT NULL,
    samples INTEGER NOT NULL,
    modalities TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    weight REAL NOT NULL,
    norm REAL,
    path TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'applied')),
    applied_version INTEGER,
    received_at REAL NOT NULL,
    digest TEXT,
    steps TEXT,
    UNIQUE (edge_id, seq)
);
CREATE INDEX IF NOT EXISTS updates_status ON updates (status);
CREATE TABLE IF NOT EXISTS rejections (
    id INTEGER PRIMARY KEY,
    edge_id TEXT NOT NULL,
    seq INTEGER,
    base_version INTEGER,
    received_version INTEGER,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS globals (
    version INTEGER PRIMARY KEY,
    strategy TEXT NOT NULL,
    path TEXT NOT NULL,
    opt_path TEXT,
    n_updates INTEGER NOT NULL,
    meta TEXT NOT NULL,
    created_at REAL NOT NULL
);
"""



class Ledger:
    """One process owns a ledger directory at a time (the service is the single writer)."""

    #: site profiles and seq reservations stay plain files in the state directory
    docs: DocStore | None = None

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        (self.root / "updates").mkdir(parents=True, exist_ok=True)
        (self.root / "globals").mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.root / "ledger.sqlite", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")  # pragma: no mutate (SQL)
        self._db.execute("PRAGMA synchronous=FULL")  # pragma: no mutate (SQL)
        self._db.executescript(_SCHEMA)
        cols = {r[1] for r in self._db.execute("PRAGMA table_info(updates)")}  # pragma: no mutate (SQL)
        for col in ("digest", "steps"):  # a ledger from before content dedup / step clipping
            if col not in cols:
                self._db.execute(f"ALTER TABLE updates ADD COLUMN {col} TEXT")  # pragma: no mutate (SQL)
        self._db.execute(
            "CREATE INDEX IF NOT EXISTS updates_digest ON updates (edge_id, digest)"  # pragma: no mutate (SQL)
        )
        self._remove_orphans()

    # ---- lifecycle -----------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_lease(self) -> None:
        """Nothing to check: one process owns the directory (see ``ledger_pg`` for the replicated ledger)."""

    def _remove_orphans(self) -> None:
        """Files written but never committed (crash between write and commit) are garbage."""
        known = {r[0] for r in self._db.execute("SELECT path FROM updates")}  # pragma: no mutate (SQL)
        for r in self._db.execute("SELECT path, opt_path FROM globals"):  # pragma: no mutate (SQL)
            known.update(p for p in r if p)
        for sub in ("updates", "globals"):
            for f in (self.root / sub).iterdir():
                rel = f"{sub}/{f.name}"
                if rel not in known:
                    f.unlink(missing_ok=True)

    # ---- dedup ----------------------------------------------------------------------------
    def seen(self, edge_id: str, seq: int) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM updates WHERE edge_id=? AND seq=?", (edge_id, seq)  # pragma: no mutate (SQL)
        ).fetchone()
        return row is not None

    def seen_content(self, edge_id: str, digest: str) -> bool:
        """Whether ``edge_id`` already had an update with these exact tensors accepted (any seq)."""
        row = self._db.execute(
            "SELECT 1 FROM updates WHERE edge_id=? AND digest=?", (edge_id, digest)  # pragma: no mutate (SQL)
        ).fetchone()
        return row is not None

    def last_seq(self, edge_id: str) -> int | None:
        row = self._db.execute(
            "SELECT MAX(seq) FROM updates WHERE edge_id=?", (edge_id,)  # pragma: no mutate (SQL)
        ).fetchone()
        return None if row[0] is None else int(row[0])

    # ---- updates -------------------------------------------------------------------------
    def accept(
        self, c: Contribution, received_version: int, weight: float, norm: float | None = None,
        digest: str | None = None, steps: dict[str, float] | None = None,
    ) -> int:
        """Persist an accepted update; returns its id.  Acknowledge the edge only after this returns."""
        edge_hash = hashlib.sha256(c.edge_id.encode()).hexdigest()[:16]
        # unique name: a racing replay must never overwrite the file of the copy that won
        rel = f"updates/{edge_hash}_{c.seq}_{uuid.uuid4().hex[:12]}.safetensors"
        save_tensors(self.root / rel, c.tensors, {"edge_id": c.edge_id, "seq": str(c.seq)})
        with self._lock:
            try:
                cur = self._db.execute(
                    "INSERT INTO updates (edge_id, seq, base_version, received_version,"  # pragma: no mutate (SQL)
                    " rank, alpha, samples,"  # pragma: no mutate (SQL)
                    " modalities, fingerprint, weight, norm, path, status,"  # pragma: no mutate (SQL)
                    " received_at, digest, steps)"  # pragma: no mutate (SQL)
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,'pending',?,?,?)",  # pragma: no mutate (SQL)
                    (
                        c.edge_id,
                        c.seq,
                        c.base_version,
                        received_version,
                        c.rank,
                        float(c.alpha),
                        c.samples,
                        json.dumps(c.modalities, sort_keys=True),
                        c.fingerprint,
                        float(weight),
                        norm,
                        rel,
                        time.time(),
                        digest,
                        None if steps is None else json.dumps(steps, sort_keys=True),
                    ),
                )
            except sqlite3.IntegrityError as e:
                # the same (edge, seq) raced past validation: the first copy wins
                (self.root / rel).unlink(missing_ok=True)
                raise DuplicateUpdate(f"{c.edge_id}#{c.seq}") from e
            return int(cur.lastrowid or 0)

    def reject(
        self,
        edge_id: str,
        seq: int | None,
        reason: str,
        detail: str = "",
        base_version: int | None = None,
        received_version: int | None = None,
    ) -> None:
        """Record a refusal for an audit.  The service no longer calls it: a refusal must cost no disk write
        (a flood of garbage would otherwise buy an fsync each); old rows still count in ``counts``."""
        with self._lock:
            self._db.execute(
                "INSERT INTO rejections"  # pragma: no mutate (SQL)
                " (edge_id, seq, base_version, received_version, reason, detail, at)"  # pragma: no mutate (SQL)
                " VALUES (?,?,?,?,?,?,?)",  # pragma: no mutate (SQL)
                (edge_id, seq, base_version, received_version, reason, detail, time.time()),
            )

    def rejections(self) -> list[tuple[str, int | None, str]]:
        return list(self._db.execute(
            "SELECT edge_id, seq, reason FROM rejections ORDER BY id"  # pragma: no mutate (SQL)
        ))

    def accepted_seqs(self, edge_id: str, limit: int = 32) -> list[int]:
        """The edge's last ``limit`` accepted seqs, ascending: the acknowledgement an edge waits for."""
        rows = self._db.execute(
            "SELECT seq FROM updates WHERE edge_id=? ORDER BY seq DESC LIMIT ?",  # pragma: no mutate (SQL)
            (edge_id, int(limit)),
        )
        return sorted(int(r[0]) for r in rows)

    def recent_norms(self, limit: int) -> list[float]:
        """Effective norms of the last ``limit`` accepted updates, oldest first (re-arms the norm guard)."""
        rows = self._db.execute(
            "SELECT norm FROM updates WHERE norm IS NOT NULL ORDER BY id DESC LIMIT ?",  # pragma: no mutate (SQL)
            (int(limit),),
        ).fetchall()
        return [float(r[0]) for r in reversed(rows)]

    def recent_steps(self, limit: int) -> list[dict[str, float]]:
        """Per-module steps of the last ``limit`` accepted updates, oldest first (re-arms the step bound)."""
        rows = self._db.execute(
            "SELECT steps FROM updates WHERE steps IS NOT NULL ORDER BY id DESC LIMIT ?",  # pragma: no mutate (SQL)
            (int(limit),),
        ).fetchall()
        return [{str(k): float(v) for k, v in json.loads(r[0]).items()} for r in reversed(rows)]

    def counts(self) -> tuple[int, dict[str, int]]:
        """``(accepted, {reason: rejected})`` over the ledger's whole life (metrics survive restarts)."""
        accepted = int(self._db.execute("SELECT COUNT(*) FROM updates").fetchone()[0])  # pragma: no mutate (SQL)
        rejected = dict(self._db.execute(
            "SELECT reason, COUNT(*) FROM rejections GROUP BY reason"  # pragma: no mutate (SQL)
        ))
        return accepted, {str(k): int(v) for k, v in rejected.items()}

    def applied_in(self, version: int) -> list[tuple[str, int]]:
        """``(edge_id, seq)`` of the updates that ``version`` consumed (audits and tests)."""
        rows = self._db.execute(
            "SELECT edge_id, seq FROM updates WHERE applied_version=? ORDER BY id", (int(version),)  # pragma: no mutate
        )
        return [(str(e), int(s)) for e, s in rows]

    def pending_count(self) -> int:
        return int(self._db.execute(
            "SELECT COUNT(*) FROM updates WHERE status='pending'"  # pragma: no mutate (SQL)
        ).fetchone()[0])

    def pending(self, limit: int | None = None) -> list[PendingUpdate]:
        """Accepted-but-unapplied updates in arrival order, tensors loaded (survives restarts)."""
        where = "status='pending' ORDER BY id" + (f" LIMIT {int(limit)}" if limit is not None else "")
        return self._load_updates(where, ())

    def applied_updates(self, version: int) -> list[PendingUpdate]:
        """The updates ``version`` consumed, in arrival order (audits: replay a version from its inputs)."""
        return self._load_updates("applied_version=? ORDER BY id", (int(version),))  # pragma: no mutate (SQL)

    def _load_updates(self, where: str, args: tuple[object, ...]) -> list[PendingUpdate]:
        q = (
            "SELECT id, edge_id, seq, base_version, received_version,"  # pragma: no mutate (SQL)
            " rank, alpha, samples, modalities,"  # pragma: no mutate (SQL)
            " fingerprint, weight, path FROM updates WHERE " + where  # pragma: no mutate (SQL)
        )
        out = []
        for r in list(self._db.execute(q, args)):
            c = Contribution(
                edge_id=r[1],
                seq=r[2],
                base_version=r[3],
                rank=r[5],
                alpha=r[6],
                samples=r[7],
                modalities=json.loads(r[8]),
                fingerprint=r[9],
                tensors=load_file(self.root / r[11]),
            )
            out.append(PendingUpdate(id=r[0], contribution=c, weight=r[10], received_version=r[4]))
        return out

    # ---- globals -------------------------------------------------------------------------
    def latest_version(self) -> int | None:
        row = self._db.execute("SELECT MAX(version) FROM globals").fetchone()  # pragma: no mutate (SQL)
        return None if row[0] is None else int(row[0])

    def commit_global(
        self,
        g: GlobalState,
        applied: Iterable[int],
        server_state: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Publish ``g`` as the next version and mark ``applied`` update ids as consumed, atomically."""
        applied = sorted(set(applied))
        latest = self.latest_version()
        if latest is not None and g.version != latest + 1:
            raise VersionConflict(f"version {g.version} after {latest}")
        rel = f"globals/v{g.version:08d}.safetensors"
        save_tensors(self.root / rel, g.tensors, {"strategy": g.strategy})
        opt_rel = None
        if server_state:
            opt_rel = f"globals/v{g.version:08d}.opt.safetensors"
            save_tensors(self.root / opt_rel, server_state)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")  # pragma: no mutate (SQL)
            try:
                self._db.execute(
                    "INSERT INTO globals"  # pragma: no mutate (SQL)
                    " (version, strategy, path, opt_path, n_updates, meta, created_at)"  # pragma: no mutate (SQL)
                    " VALUES (?,?,?,?,?,?,?)",  # pragma: no mutate (SQL)
                    (g.version, g.strategy, rel, opt_rel, len(applied), json.dumps(g.meta, default=str), time.time()),
                )
                changed = 0
                for chunk in _chunks(applied, 500):
                    marks = ",".join("?" * len(chunk))
                    changed += self._db.execute(
                        "UPDATE updates SET status='applied', applied_version=?"  # pragma: no mutate (SQL)
                        f" WHERE status='pending' AND id IN ({marks})",  # pragma: no mutate (SQL)
                        (g.version, *chunk),
                    ).rowcount
                if changed != len(applied):
                    raise VersionConflict(f"{len(applied) - changed} of the updates are not pending")
                self._db.execute("COMMIT")  # pragma: no mutate (SQL)
            except BaseException:
                self._db.execute("ROLLBACK")  # pragma: no mutate (SQL)
                raise

    def latest_global(self) -> GlobalState | None:
        """The last committed global (resume point after a crash), or None before the first."""
        row = self._db.execute(
            "SELECT version FROM globals ORDER BY version DESC LIMIT 1"  # pragma: no mutate (SQL)
        ).fetchone()
        return None if row is None else self.load_global(int(row[0]))

    def load_global(self, version: int) -> GlobalState:
        row = self._db.execute(
            "SELECT strategy, path, meta FROM globals WHERE version=?", (version,)  # pragma: no mutate (SQL)
        ).fetchone()
        if row is None:
            raise KeyError(version)
        return GlobalState(
            version=version, tensors=load_file(self.root / row[1]), strategy=row[0], meta=json.loads(row[2])
        )

    def server_state(self, version: int | None = None) -> dict[str, np.ndarray]:
        """Server-optimizer state saved with ``version`` (default: latest); empty if none."""
        version = self.latest_version() if version is None else version
        if version is None:
            return {}
        row = self._db.execute(
            "SELECT opt_path FROM globals WHERE version=?", (version,)  # pragma: no mutate (SQL)
        ).fetchone()
        return load_file(self.root / row[0]) if row and row[0] else {}

    def prune(self, keep_globals: int = 3) -> int:
        """Delete tensors of applied updates and of all but the last ``keep_globals`` versions (rows stay)."""
        removed = 0
        with self._lock:
            rows = list(self._db.execute(
                "SELECT id, path FROM updates WHERE status='applied' AND path != ''"  # pragma: no mutate (SQL)
            ))
            for uid, rel in rows:
                (self.root / rel).unlink(missing_ok=True)
                self._db.execute("UPDATE updates SET path='' WHERE id=?", (uid,))  # pragma: no mutate (SQL)
                removed += 1
            old = list(
                self._db.execute(
                    "SELECT version, path, opt_path FROM globals WHERE path != ''"  # pragma: no mutate (SQL)
                    " ORDER BY version DESC LIMIT -1 OFFSET ?",  # pragma: no mutate (SQL)
                    (keep_globals,),
                )
            )
            for version, rel, opt_rel in old:
                for p in (rel, opt_rel):
                    if p:
                        (self.root / p).unlink(missing_ok=True)
                self._db.execute(
                    "UPDATE globals SET path='', opt_path=NULL WHERE version=?", (version,)  # pragma: no mutate (SQL)
                )
                removed += 1
        return removed



def open_ledger(url: str, state_dir: str | Path, *, epoch: int | None = None) -> LedgerBackend:
    """The configured backend: ``""`` is sqlite in ``state_dir``; ``postgresql://...`` is PostgreSQL, its writes
    fenced by ``epoch`` (the lease this replica holds; see ``leader.py``)."""
    if not url:
        return Ledger(state_dir)
    from .ledger_pg import PgLedger  # psycopg only where PostgreSQL is configured

    return PgLedger(url, epoch=epoch)
