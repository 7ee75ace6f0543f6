"""What every broker runner shares: a state directory (temporary unless given), one child process, and use as
a context manager (``with Runner() as broker:`` starts it, leaving stops it and removes a temporary dir)."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Self


class ChildProcessRunner:
    """Base of the runners (Mosquitto, NATS, RabbitMQ): subclasses write their config and start ``_proc``."""

    def __init__(self, state_dir: Path | None, *, prefix: str) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix=prefix) if state_dir is None else None
        self.state_dir = Path(self._tmp.name) if self._tmp else Path(state_dir)  # type: ignore[arg-type]
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self, *, kill: bool = False) -> None:
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def close(self) -> None:
        """Stop the broker and remove its state directory if it was a temporary one."""
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
