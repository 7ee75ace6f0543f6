"""The serving copy in a process of its own, so predictions do not share the training thread's GIL.

Why: the thread :class:`~edge_agent.inference.Predictor` never waits for a training step, but on a small
CPU a tiny model's forward is mostly Python, and Python hands the interpreter lock between the trainer's
and the predictor's threads only every few milliseconds: a device measured p99 38 ms while the edge
trained, 5 ms while it idled (``bench/bench_edge.py``, 2 cores).  A child process has its own
interpreter and its own torch thread budget (``training.inference_threads``).

The child builds the same frozen base from the model config (the base is deterministic: the edge's
fingerprint says so) and receives only the trainable tensors, on start and on every :meth:`sync`,
as numpy arrays over a pipe; requests and answers cross the same pipe.  Same interface as the thread
predictor.  A child that dies is started again on the next call, with the last synced tensors, and
that call is retried once; if the new child fails too the call raises :class:`PredictorDown`, which
the service answers as an error to the device.  Cost: a second copy of the base model in memory and a
few seconds to start (torch and peft imports).
"""

from __future__ import annotations

import multiprocessing as mp
import threading
from collections.abc import Mapping, Sequence
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch

from megace_model.config import EdgeModelConfig
from megace_model.errors import EdgeModelError

#: seconds a child may take to import torch and peft and build the base before it counts as failed
START_TIMEOUT_S = 120.0


class PredictorDown(EdgeModelError):
    """The inference process died and could not be started again."""


def _numpy(tensors: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for k, v in tensors.items()}


def _serve(conn: Connection, model: dict[str, Any], device: str, threads: int) -> None:
    """The child: build, then answer ``("sync", shared, personal)`` and ``("predict", samples)`` until EOF."""
    torch.set_num_threads(threads)
    from megace_model.adapters import build_edge_model

    from .inference import Predictor

    config = EdgeModelConfig.from_dict(model)
    predictor = Predictor(build_edge_model(config).to(device), config, torch.device(device))
    conn.send(("ready", None))
    while True:
        try:
            op, *args = conn.recv()
        except EOFError:
            return
        try:
            if op == "sync":
                shared, personal, version = args
                predictor.sync({k: torch.from_numpy(v) for k, v in shared.items()},
                               {k: torch.from_numpy(v) for k, v in personal.items()}, version)
                conn.send(("ok", None))
            elif op == "predict":
                conn.send(("ok", predictor.predict(args[0])))
            else:
                conn.send(("error", f"unknown op {op!r}"))
        except EdgeModelError as exc:
            conn.send(("refused", exc))
        except Exception as exc:  # reported to the parent, which raises it there; the child keeps serving
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class ProcessPredictor:
    """A :class:`~edge_agent.inference.Predictor` in a child process; call from one thread at a time."""

    def __init__(self, config: EdgeModelConfig, device: torch.device, *, threads: int = 1,
                 shared: Mapping[str, Any] | None = None, personal: Mapping[str, Any] | None = None,
                 version: int = 0) -> None:
        self.config = config
        self.device = device
        self.threads = threads
        self.version = version
        self.restarts = 0
        self._state = (_numpy(shared or {}), _numpy(personal or {}))
        self._lock = threading.Lock()
        self._proc: Any = None
        self._conn: Connection | None = None
        self._start()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _start(self) -> None:
        ctx = mp.get_context("spawn")  # never fork a process holding torch threads and an event loop
        parent, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, self.config.to_dict(), str(self.device), self.threads),
                                 name="megace-infer", daemon=True)
        self._proc.start()
        child.close()
        self._conn = parent
        try:
            ready = parent.poll(START_TIMEOUT_S) and parent.recv()[0] == "ready"
        except (EOFError, OSError):  # it died while building (the pipe closed)
            ready = False
        if not ready:
            code = self._proc.exitcode
            self.close()
            raise PredictorDown(f"the inference process did not start (exit code {code})")
        if self._state[0] or self._state[1]:
            self._call("sync", *self._state, self.version)

    def _call(self, op: str, *args: Any) -> Any:
        assert self._conn is not None
        self._conn.send((op, *args))
        status, value = self._conn.recv()
        if status == "refused":
            raise value
        if status != "ok":
            raise RuntimeError(f"inference process: {value}")
        return value

    def _call_alive(self, op: str, *args: Any) -> Any:
        """``op`` on the child; a dead child is started again once (with the last tensors) and asked again."""
        with self._lock:
            try:
                return self._call(op, *args)
            except (EOFError, BrokenPipeError, ConnectionResetError, OSError):
                self.close()
                self.restarts += 1
                try:
                    self._start()
                    return self._call(op, *args)
                except (EOFError, BrokenPipeError, ConnectionResetError, OSError) as exc:
                    raise PredictorDown(f"the inference process died: {exc}") from exc

    def sync(self, shared: Mapping[str, torch.Tensor], personal: Mapping[str, torch.Tensor], version: int) -> None:
        """Install new trainable tensors in the child (validated there; a refusal leaves it as it was)."""
        state = (_numpy(shared), _numpy(personal))
        self._call_alive("sync", *state, version)
        self._state, self.version = state, version

    def predict(self, samples: Sequence[Mapping[str, Any]]) -> list[tuple[int, np.ndarray]]:
        """Class index and float32 probabilities for each sample, computed in the child."""
        return self._call_alive("predict", [dict(s) for s in samples])

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._proc is not None:
            self._proc.join(5)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(5)
            self._proc = None
