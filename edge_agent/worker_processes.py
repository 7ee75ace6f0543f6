"""The edge's own inference workers as child processes (``megace edge --inference-workers N``).

Kept apart from :mod:`edge_agent.infer_worker` (what one worker does) because this is the edge's side:
when to start them (the first MQTT 5 connection, and an identity of their own in the secure set-up), how
to start one, and starting a dead one again.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from broker.metrics import Counters
from edge_agent.config import EdgeConfig
from edge_agent.infer_worker import EXIT_NO_V5, group_name

log = logging.getLogger(__name__)

_ROOT = str(Path(__file__).resolve().parent.parent)
WATCH_S = 2.0
"""How often an edge looks for a dead worker of its own to start again."""


class WorkerProcesses:
    """The ``--inference-workers`` children of an edge: started once the edge's connection is MQTT 5, and
    started again (``inference_worker_restarts``) when one dies, unless it exited for a bad config (2) or
    because the broker has no MQTT 5 (3)."""

    def __init__(self, config: EdgeConfig, count: int, *, watch_s: float = WATCH_S) -> None:
        self.config = config
        self.count = count
        self.watch_s = watch_s
        self.procs: list[subprocess.Popen[bytes]] = []
        """One per worker id ``<edge_id>-w<i>``, in order; a restarted worker replaces its entry."""
        self.decided = False
        self.counters = Counters()
        self._path = config.state_path / "infer-worker.toml"
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def on_connected(self, v5: bool, counters: Counters) -> None:
        """Start the workers on the first MQTT 5 connection; on 3.1.1 say once that none will run."""
        if self.decided or self.count < 1:
            return
        self.decided = True
        self.counters = counters
        if not v5:
            counters.inc("inference_workers_refused")
            log.warning("edge %s: inference_workers = %d not started: the broker speaks MQTT 3.1.1 (no shared "
                        "subscriptions); the edge serves every prediction itself", self.config.edge_id, self.count)
            return
        address = self.config.address
        if address.identified and not self.config.worker_identities:
            counters.inc("inference_workers_refused")
            log.warning("edge %s: inference_workers = %d not started: the edge connects as an identity (%s) and a "
                        "worker with the same one would take over the edge's session on a broker that makes the "
                        "user name the client id (megace's secure set-up); issue workers their own identities "
                        "(megace provision workers) and set worker_identities", self.config.edge_id, self.count,
                        address.username or address.cert_file)
            return
        self.config.write(self._path)
        with self._lock:
            self.procs = [self._spawn(i) for i in range(1, self.count + 1)]
        counters.set("inference_workers", float(self.count))
        log.info("edge %s: started %d inference workers in group %s", self.config.edge_id, self.count,
                 group_name(self.config))
        self._watcher = threading.Thread(target=self._watch, name=f"megace-infer-watch-{self.config.edge_id}",
                                         daemon=True)
        self._watcher.start()

    def worker_id(self, i: int) -> str:
        return f"{self.config.edge_id}-w{i}"

    def _spawn(self, i: int) -> subprocess.Popen[bytes]:
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
               "PYTHONPATH": os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)}
        worker_id = self.worker_id(i)
        command = [sys.executable, "-m", "edge_agent.infer_worker", "--config", str(self._path), "--worker-id",
                   worker_id]
        with open(self.log_path(worker_id), "ab") as out:  # the child keeps its own descriptor
            return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)

    def _watch(self) -> None:
        """Every ``watch_s``: start again a worker that died (a crash, a kill), never one that refused."""
        while not self._stop.wait(self.watch_s):
            with self._lock:
                for n, proc in enumerate(self.procs):
                    code = proc.poll()
                    if code is None or code in (2, EXIT_NO_V5) or self._stop.is_set():
                        continue
                    self.counters.inc("inference_worker_restarts")
                    log.warning("edge %s: inference worker %s exited (%s); starting it again", self.config.edge_id,
                                self.worker_id(n + 1), code)
                    self.procs[n] = self._spawn(n + 1)

    def log_path(self, worker_id: str) -> Path:
        """Where a spawned worker's output goes: ``<state_dir>/infer-<worker_id>.log``."""
        return self.config.state_path / f"infer-{worker_id}.log"

    def close(self, timeout: float = 10.0) -> None:
        """Stop watching, SIGTERM every worker, then SIGKILL what is left after ``timeout``."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout)
        with self._lock:
            procs = list(self.procs)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


__all__ = ["WATCH_S", "WorkerProcesses"]
