"""Installing models off paho's network thread: the SDK's glue between the ``model`` downlink and
:class:`device_sdk.local_model.LocalModel`.

Why a thread: checking and loading a model takes from milliseconds to seconds (onnxruntime builds its session,
the file is fsync'd), and downlink callbacks run in paho's network thread, which must never block. Only the
newest pending model matters: one arriving while another installs replaces the pending one (counted).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from broker.wire import Kind
from broker.wire.model import ModelUpdate
from device_sdk.local_model import LocalModel

log = logging.getLogger(__name__)


class ModelInstaller:
    """Installs models off paho's network thread (loading a model takes a while); the newest pending one wins.

    ``on_installed(version)`` runs in the installer's thread after a model is switched in (the client then
    re-announces its registration and status with the new version).
    """

    def __init__(self, model: LocalModel, on_installed: Callable[[int], None] | None = None) -> None:
        self.model = model
        self.on_installed = on_installed
        self._cond = threading.Condition()
        self._pending: ModelUpdate | None = None
        self._busy = False
        self._closed = False
        self._thread: threading.Thread | None = None

    def wrap(self, handler: Callable[[Kind, Any], None] | None) -> Callable[[Kind, Any], None]:
        """A downlink handler that queues models for installing and hands every message on to ``handler``."""
        def on_downlink(kind: Kind, message: Any) -> None:
            if kind is Kind.MODEL:
                self.submit(message)
            if handler is not None:
                handler(kind, message)
        return on_downlink

    def submit(self, msg: ModelUpdate) -> None:
        with self._cond:
            if self._closed:
                return
            if self._pending is not None:
                self.model.counters.inc("model_superseded")
            self._pending = msg
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="megace-sdk-model", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def idle(self, timeout: float = 30.0) -> bool:
        """Wait until nothing is pending or being installed; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending is not None or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def close(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                msg, self._pending, self._busy = self._pending, None, True
            try:
                if self.model.offer(msg) and self.on_installed is not None:
                    self.on_installed(msg.model_version)
            except Exception:  # the installer must outlive a failure (a full disk, a bad callback)
                self.model.counters.inc("model_install_errors")
                log.exception("installing model v%s failed", msg.model_version)  # pragma: no mutate
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
