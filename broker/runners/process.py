"""One Mosquitto child process for one generated config: start it, know it is ready, stop it, clean up.

Shared by the plain runner (:mod:`broker.runners.mosquitto`) and the secure one
(:mod:`broker.runners.secure`), which differ only in the config they write and the ports they open.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

from broker.runners.child import ChildProcessRunner
from broker.runners.ports import wait_for_port


def find_mosquitto() -> str:
    """Path of the mosquitto binary, or a clear error telling how to install it."""
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if candidate and Path(candidate).exists():
            return candidate
    raise FileNotFoundError("mosquitto not found; install it with `apt-get install -y mosquitto` (Debian/Ubuntu)")


def wait_sigterm_handler(pid: int, timeout: float = 5.0) -> None:
    """Mosquitto opens its listeners before it installs its signal handlers: a SIGTERM in between
    kills it without the final save. Wait until /proc says SIGTERM is caught (Linux; elsewhere, no-op)."""
    status = Path(f"/proc/{pid}/status")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            caught = next(line for line in status.read_text().splitlines() if line.startswith("SigCgt:"))
        except (OSError, StopIteration):
            return
        if int(caught.split()[1], 16) & (1 << (signal.SIGTERM - 1)):
            return
        time.sleep(0.005)


class MosquittoProcess(ChildProcessRunner):
    """Base of the runners: ``state_dir`` (a temporary one unless given) holds the config and persistence.

    Subclasses write ``config_path`` and call :meth:`_launch` with the ports the config opens.
    """

    def __init__(self, state_dir: Path | None, *, prefix: str) -> None:
        super().__init__(state_dir, prefix=prefix)
        self.config_path = self.state_dir / "mosquitto.conf"

    def _launch(self, host: str, ports: list[int], what: str) -> None:
        """Run mosquitto on ``config_path``; return once every port listens and SIGTERM is handled."""
        self._proc = subprocess.Popen([find_mosquitto(), "-c", str(self.config_path)], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, start_new_session=True)
        try:
            for port in ports:
                wait_for_port(host, port)
        except TimeoutError:
            err = b""
            if self._proc.poll() is not None and self._proc.stderr:
                err = self._proc.stderr.read()
            self.stop()
            raise RuntimeError(f"{what} did not start on {host}:{ports}: {err.decode(errors='replace')}") from None
        if self._proc.stderr:
            self._proc.stderr.close()  # never read again: a full pipe must not block the broker
            self._proc.stderr = None
        wait_sigterm_handler(self._proc.pid)

    def stop(self, *, kill: bool = False) -> None:
        """Stop the broker (SIGTERM saves persistence; ``kill=True`` simulates a crash)."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._proc.stderr:
            self._proc.stderr.close()
        self._proc = None
