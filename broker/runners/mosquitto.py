"""Run a Mosquitto broker as a child process on a loopback port (tests, benchmarks, ``megace run``).

The generated config lifts ``max_queued_messages`` because Mosquitto's default
(1000) silently drops QoS 0 messages to slow subscribers. It keeps a finite
``max_inflight_messages``: measured here, with an unlimited in-flight window a
SIGTERM'd Mosquitto 2.0.11 lost the QoS 1 messages it had in flight to a
persistent subscriber (108 of 1000); with 20 it redelivered them after restart.
``set_tcp_nodelay`` matters for request/response: without it the broker's write of a
request waits behind Nagle for the delayed ACK of its previous PUBACK, and a device's
inference round trip through an edge took about 40 ms instead of under 1 ms.

Persistence: started as root, Mosquitto drops to user ``mosquitto`` unless told otherwise, and
that user cannot write the 0700 temp state dir, so ``persistence true`` silently wrote nothing.
The config therefore names the current user (``user`` only matters when started as root).
Mosquitto 2.0 has no write-ahead log: it writes (and fsyncs) the whole database on each autosave.
Saving after every change (``autosave_on_changes=True, autosave_interval=1``, as in
``deploy/mosquitto/durability.conf``) shrinks what a SIGKILL loses to the PUBACKs of one event-loop
pass, but an fsync per pass cut one publisher from about 3,900 to 130 acknowledged records/s on
this machine's disk (bench/results/durability.json); the shared test broker therefore keeps a save
per second, and the reliability tests ask for the per-change saves.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from broker.runners.ports import free_port, wait_for_port

CONFIG_TEMPLATE = """\
listener {port} {host}
allow_anonymous true
max_queued_messages 0
max_inflight_messages 20
set_tcp_nodelay true
persistence {persistence}
persistence_location {state_dir}/
autosave_interval {autosave_interval}
autosave_on_changes {autosave_on_changes}
user {user}
log_dest stderr
log_type error
log_type warning
"""


def find_mosquitto() -> str:
    """Path of the mosquitto binary, or a clear error telling how to install it."""
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if candidate and Path(candidate).exists():
            return candidate
    raise FileNotFoundError("mosquitto not found; install it with `apt-get install -y mosquitto` (Debian/Ubuntu)")


def _current_user() -> str:
    """Who the broker should stay: as root, Mosquitto would otherwise drop to ``mosquitto``."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:  # a uid without a passwd entry (containers): only root would switch, and root has one
        return "root" if os.geteuid() == 0 else "mosquitto"


def _wait_sigterm_handler(pid: int, timeout: float = 5.0) -> None:
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


class MosquittoBroker:
    """A private Mosquitto on ``host:port``; :meth:`stop` + :meth:`start` keep its persistence."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, persistence: bool = True,
                 state_dir: Path | None = None, autosave_interval: int = 1,
                 autosave_on_changes: bool = False) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.persistence = persistence
        # on_changes: save after ``autosave_interval`` changes; otherwise every ``autosave_interval`` seconds
        self.autosave_interval = autosave_interval
        self.autosave_on_changes = autosave_on_changes
        self._tmp = tempfile.TemporaryDirectory(prefix="megace-mosquitto-") if state_dir is None else None
        self.state_dir = Path(self._tmp.name) if self._tmp else Path(state_dir)  # type: ignore[arg-type]
        self.config_path = self.state_dir / "mosquitto.conf"
        self.db_path = self.state_dir / "mosquitto.db"  # written on autosave and on SIGTERM
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> MosquittoBroker:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            CONFIG_TEMPLATE.format(
                port=self.port, host=self.host, state_dir=self.state_dir,
                persistence="true" if self.persistence else "false",
                autosave_interval=self.autosave_interval,
                autosave_on_changes="true" if self.autosave_on_changes else "false",
                user=_current_user(),
            )
        )
        self._proc = subprocess.Popen(
            [find_mosquitto(), "-c", str(self.config_path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        )
        try:
            wait_for_port(self.host, self.port)
        except TimeoutError:
            err = b""
            if self._proc.poll() is not None and self._proc.stderr:
                err = self._proc.stderr.read()
            self.stop()
            msg = err.decode(errors="replace")
            raise RuntimeError(f"mosquitto did not start on {self.host}:{self.port}: {msg}") from None
        if self._proc.stderr:
            self._proc.stderr.close()  # never read again: a full pipe must not block the broker
            self._proc.stderr = None
        _wait_sigterm_handler(self._proc.pid)
        return self

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

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

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
