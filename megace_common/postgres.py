"""A private PostgreSQL cluster on a free loopback port, for tests and benches (never the machine's own server).

Debian's ``postgresql`` package puts its binaries in ``/usr/lib/postgresql/<major>/bin``.  ``initdb`` and the
server refuse to run as root, and CI runs as root: then every server command runs as the ``postgres`` user
(``runuser``) on a directory owned by it.  ``fsync`` stays on, so a commit the tests see acknowledged is on disk
as in production; ``initdb --no-sync`` only skips the one-off sync of the template files.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from types import TracebackType
from typing import Self

from broker.runners.ports import free_port, wait_for_port


class PostgresNotFound(FileNotFoundError):
    """No PostgreSQL server binaries: install Debian's ``postgresql`` package."""


def find_pg_bin() -> Path:
    """The newest ``/usr/lib/postgresql/<major>/bin`` holding ``initdb`` (or ``$MEGACE_PG_BIN``)."""
    env = os.environ.get("MEGACE_PG_BIN")
    candidates = [Path(env)] if env else sorted(
        Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    for c in candidates:
        if (c / "initdb").exists() and (c / "pg_ctl").exists():
            return c
    raise PostgresNotFound("PostgreSQL not found; install it with `apt-get install -y postgresql` (Debian/Ubuntu)")


class PostgresServer:
    """``with PostgresServer() as pg: url = pg.create_database("t1")``; stops and deletes the cluster on exit."""

    def __init__(self, *, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.bin = find_pg_bin()
        self._tmp = Path(tempfile.mkdtemp(prefix="megace-pg-"))
        self.data_dir = self._tmp / "data"
        self.log_path = self._tmp / "server.log"
        self._as_postgres = os.geteuid() == 0
        self.running = False

    def _run(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        cmd = [str(a) for a in args]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)

    def start(self) -> Self:
        if self._as_postgres:
            pw = pwd.getpwnam("postgres")
            os.chown(self._tmp, pw.pw_uid, pw.pw_gid)
        r = self._run(str(self.bin / "initdb"), "-D", str(self.data_dir), "-A", "trust", "-U", "postgres",
                      "--no-sync", "-E", "UTF8", "--locale=C")
        if r.returncode != 0:
            raise RuntimeError(f"initdb failed: {r.stderr.strip()}")
        return self.restart()

    def restart(self) -> Self:
        """Start the server on the existing cluster (after :meth:`stop`: a crash-restart when stopped with
        ``immediate``, which is what :meth:`stop` does)."""
        opts = (f"-p {self.port} -k {self._tmp} -c listen_addresses={self.host} -c max_connections=100"
                " -c shared_buffers=32MB -c fsync=on")
        r = self._run(str(self.bin / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log_path), "-o", opts,
                      "-w", "-t", "60", "start")
        if r.returncode != 0:
            raise RuntimeError(f"postgres did not start on {self.host}:{self.port}: {r.stderr.strip()} "
                               f"{self._log_tail()}")
        wait_for_port(self.host, self.port, 30.0)
        self.running = True
        return self

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/{dbname}"

    def create_database(self, name: str | None = None) -> str:
        """A new empty database (a fresh ledger per test); returns its URL."""
        import psycopg  # the cloud's extra; only callers that use a database need it

        name = name or f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # name is ours (hex), not user input
        return self.url(name)

    def stop(self) -> None:
        """Stop at once, as a crash would (``-m immediate``: no checkpoint, WAL replay at the next start)."""
        if self.running:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data_dir), "-m", "immediate", "-w", "stop",
                      timeout=60)
            self.running = False

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
