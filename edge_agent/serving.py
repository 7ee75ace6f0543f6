"""Inference serving: a bounded request queue, batched forwards on the :class:`Predictor` copy, in its own thread.

A prediction never waits for a training step and never blocks ingest; overflow is answered ``busy``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from edge_agent.config import EdgeConfig
from edge_agent.core import EdgeCore, InferRequest, Outgoing
from edge_agent.errors import BusyError
from edge_agent.inference import Predictor
from edge_agent.inference_process import ProcessPredictor
from edge_agent.training.trainer import Trainer
from megace_model.adapters import personal_state, shared_state
from megace_model.errors import EdgeModelError

if TYPE_CHECKING:
    from edge_agent.onnx_serving import OnnxPredictor


def make_predictor(trainer: Trainer, config: EdgeConfig, version: int) -> Predictor | ProcessPredictor:
    """The serving copy the configuration asks for: a thread copy sharing the frozen base, or a process."""
    if not config.training.inference_process:
        predictor = Predictor(trainer.model, config.model, trainer.device)
        predictor.version = version
        return predictor
    return ProcessPredictor(config.model, trainer.device, threads=config.training.inference_threads,
                            shared=shared_state(trainer.model), personal=personal_state(trainer.model),
                            version=version)


def answered(request: InferRequest, out: list[Outgoing]) -> list[Outgoing]:
    """``out`` (the answer to ``request``) carrying the request's ``done``; without one, ``done`` now."""
    if not out:
        if request.done is not None:
            request.done()
        return out
    return [*out[:-1], replace(out[-1], done=request.done)]


class InferenceServer:
    """Owns the inference queue and executor; answers go out through ``emit`` (the downlink queue)."""

    def __init__(self, core: EdgeCore, emit: Callable[[list[Outgoing]], None], *, queue: int, batch: int) -> None:
        self.core = core
        self.emit = emit
        self.batch = batch
        self.queue: asyncio.Queue[InferRequest] = asyncio.Queue(maxsize=queue)
        self.predictor: Predictor | ProcessPredictor | None = None
        """The torch serving copy, always kept in sync (the fallback when ONNX is off or rejected)."""
        self.onnx: OnnxPredictor | None = None
        """Serves instead of :attr:`predictor` when set (``edge_agent.onnx_serving``); a sync clears it."""
        self.generation = 0
        """Syncs so far: an ONNX export made before the latest sync is stale and never installed."""
        self.latency_ms = 0.0
        self.pool: ThreadPoolExecutor | None = None

    def submit(self, request: InferRequest) -> None:
        """Queue one request; a full queue is answered ``busy`` (counted as a rejection)."""
        try:
            self.queue.put_nowait(request)
        except asyncio.QueueFull:
            busy = BusyError(f"{self.queue.maxsize} inference requests already waiting")
            self.emit(answered(request, self.refused(busy, request)))
            return
        self.core.counters.inc("infer_requests")

    def refused(self, exc: Exception, request: InferRequest) -> list[Outgoing]:
        """The error that answers ``request`` (its ``ref`` the request's seq, so the device knows which), kept for a
        repeat of it (:mod:`edge_agent.answers`)."""
        return self.core.answers.record(request.device, request.seq, self.core.reject(exc, request.device, request.seq))

    async def run(self) -> None:
        """Batch whatever requests are waiting into one forward on the predictor copy."""
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            while len(batch) < self.batch:
                try:
                    batch.append(self.queue.get_nowait())
                except asyncio.QueueEmpty:
                    break
            predictor = self.onnx or self.predictor
            assert predictor is not None
            try:
                results = await loop.run_in_executor(self.pool, predictor.predict, [r.sample for r in batch])
            except EdgeModelError as exc:
                for request in batch:
                    self.emit(answered(request, self.refused(exc, request)))
                continue
            now = time.perf_counter()
            self.emit([replace(self.core.prediction(request, label, probs, predictor.version), done=request.done)
                       for request, (label, probs) in zip(batch, results, strict=True)])
            self.latency_ms = (now - batch[0].received) * 1000

    def close(self) -> None:
        """Stop the inference process, if there is one (the thread copy needs nothing)."""
        if isinstance(self.predictor, ProcessPredictor):
            self.predictor.close()

    async def sync(self, shared: Mapping[str, torch.Tensor], personal: Mapping[str, torch.Tensor],
                   version: int) -> None:
        """Copy the trainer's adapters into the predictor (in the inference thread, between batches); torch
        serves from here until an ONNX export of these weights passes its checks."""
        self.onnx = None
        self.generation += 1
        predictor = self.predictor
        assert predictor is not None
        await asyncio.get_running_loop().run_in_executor(self.pool, predictor.sync, shared, personal, max(version, 0))
