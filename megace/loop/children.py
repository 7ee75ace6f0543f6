"""Edge and cloud services as child processes, started the way production starts them.

Each child is ``python -m megace edge|cloud --config FILE`` in its own session (so a Ctrl-C in the
terminal reaches only the loop, which then stops the children in order: SIGTERM, a grace period for
the service to flush and checkpoint, then SIGKILL). Their output goes to log files in the run folder.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

#: One BLAS/OpenMP thread per child: several services share a small CPU, oversubscription only slows all.
CHILD_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
}


def _die_with_parent() -> Callable[[], None] | None:
    """On Linux, a ``preexec_fn`` asking the kernel to SIGTERM the child when the loop dies (even by SIGKILL).

    The libc function is looked up here, before forking, so the child only makes one foreign call.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig, sigterm = 1, int(signal.SIGTERM)
    return lambda: prctl(pr_set_pdeathsig, sigterm)


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Children:
    """The loop's service processes; always stopped on exit, even if the loop itself fails."""

    def __init__(self, log_dir: Path, threads_per_child: int = 1) -> None:
        self.log_dir = log_dir
        self.children: list[Child] = []
        self.env = {**os.environ, **CHILD_ENV, "OMP_NUM_THREADS": str(threads_per_child)}
        self._preexec = _die_with_parent()
        atexit.register(self.stop)

    def spawn(self, name: str, role: str, config: Path) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "megace", role, "--config", str(config)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env, start_new_session=True, preexec_fn=self._preexec,
            )
        child = Child(name, proc, log)
        self.children.append(child)
        return child

    def dead(self) -> list[Child]:
        return [c for c in self.children if not c.alive]

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM every child (edges first, then the cloud), wait, then SIGKILL stragglers."""
        alive = [c for c in self.children if c.alive]
        for c in alive:
            with contextlib.suppress(ProcessLookupError):
                c.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for c in alive:
            try:
                c.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                c.proc.kill()
                c.proc.wait(5)
        self.children = [c for c in self.children if c.alive]
