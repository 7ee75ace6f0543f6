"""ONNX at the edge: after every sync of the serving copy, export the personalized model, check it, maybe serve it.

Why: onnxruntime answers faster than torch on some models and boxes and not on others (MiniLM: 12 ms vs
19 ms at batch 1 on the 2-core box), so the edge measures instead of assuming. After each round and each
applied global the service calls :meth:`OnnxServing.refresh`, which on the training thread (never the loop,
never the inference thread) copies the model with the tensors just synced, merges LoRA, exports, checks
parity on held-out samples and times both backends at batch 1 and 32 (medians). On the loop it then installs
the ONNX predictor into :class:`~edge_agent.serving.InferenceServer` if ``training.onnx`` says so:

* ``auto`` (default): serve ONNX when its batch-1 latency (the serving case) beats torch's;
* ``on``: serve ONNX whenever parity holds; ``off``: export nothing, serve torch.

A parity failure (max abs difference of the probabilities > ``training.onnx_parity_tol``) or an export
error keeps torch, counts ``onnx_rejected.<reason>`` and logs a warning saying why; the last good artifact
(on disk under ``<state_dir>/export/`` and in :attr:`OnnxServing.artifact`) stays as it was. A sync that
lands while an export runs wins: the stale export is dropped, and the sync's own refresh follows.
With ``training.inference_process``, ``auto`` keeps torch in its process (the in-thread timings say
nothing about it); the export and its checks still run, for the artifact devices get. Without the
``onnx``/``onnxruntime`` packages (the ``megace[onnx]`` extra) nothing is exported and torch serves.

The timings run while predictions go on in the inference thread, so they see the load serving sees;
a refresh costs about 1 s on the tiny model and a few seconds on MiniLM (batch 32 dominates).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from broker.metrics import Counters
from edge_agent.config import EdgeConfig
from edge_agent.training.trainer import Trainer
from megace_model.config import EdgeModelConfig
from megace_model.onnx import (
    EXPORT_DIR,
    META_FILE,
    OPSET,
    OUTPUT_NAME,
    OnnxArtifact,
    artifact_from_copy,
    onnx_feed,
    personalized_copy,
    read_artifact,
    session,
    torch_probs,
    write_artifact,
)

if TYPE_CHECKING:
    from edge_agent.serving import InferenceServer

log = logging.getLogger(__name__)

MODES = ("auto", "off", "on")
PARITY_SAMPLES = 32
REPS_B1, REPS_B32 = 7, 3

Sample = Mapping[str, Any]


class OnnxPredictor:
    """Same interface as :class:`~edge_agent.inference.Predictor`, answered by onnxruntime."""

    def __init__(self, artifact: OnnxArtifact, config: EdgeModelConfig, threads: int = 1) -> None:
        self.artifact = artifact
        self.config = config
        self.version = artifact.global_version  # what predictions name, as the torch copy's version does
        self.session = session(artifact.data, threads)

    def predict(self, samples: Sequence[Sample]) -> list[tuple[int, np.ndarray]]:
        """Class index and float32 probabilities per sample; bad samples raise ``SampleError`` as torch's do."""
        probs = self.session.run([OUTPUT_NAME], onnx_feed(samples, self.config))[0].astype(np.float32, copy=False)
        return [(int(p.argmax()), p) for p in probs]


@dataclass
class Evaluation:
    """What one refresh found on the training thread; installed (or not) on the loop."""

    version: int
    backend: str = "torch"
    reason: str = ""
    """Why this backend: faster, slower, forced, inference_process, parity, export, write, stale."""
    detail: str = ""
    artifact: OnnxArtifact | None = None
    predictor: OnnxPredictor | None = None
    timings: dict[str, float] = field(default_factory=dict)
    export_s: float | None = None

    @property
    def rejected(self) -> bool:
        return self.reason in ("parity", "export", "write")


def median_ms(call: Callable[[], Any], reps: int, warmup: int = 1) -> float:
    """Median wall time of ``call`` in milliseconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1000, 4)


def synthetic_samples(config: EdgeModelConfig, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Seeded random samples (random modality subsets and token counts), for when no held-out data exists yet."""
    rng = np.random.default_rng(seed)
    names = config.modality_names
    out: list[dict[str, Any]] = []
    for _ in range(n):
        keep = [m for m in names if rng.random() < 0.7] or [names[int(rng.integers(len(names)))]]
        modalities = {}
        for m in keep:
            spec = config.modalities[m]
            tokens = int(rng.integers(1, spec.max_tokens + 1))
            modalities[m] = rng.normal(size=(tokens, spec.token_dim)).astype(np.float32)
        out.append({"modalities": modalities})
    return out


def check_samples(trainer: Trainer, n: int = PARITY_SAMPLES) -> list[dict[str, Any]]:
    """The most recent held-out samples (what the model is about to be asked); else training samples; else
    synthetic ones (a global applied before any data arrived)."""
    train, held = trainer.split()
    pool = held or train
    if pool:
        return [{"modalities": s.as_sample()["modalities"]} for s in pool[-n:]]
    return synthetic_samples(trainer.config, n)


def last_export(directory: Path, config: EdgeModelConfig) -> OnnxArtifact | None:
    """The artifact a previous run wrote for this model, or None: none there, unreadable, or made for other
    inputs or classes (the configuration changed); logged, and the next round's export replaces it."""
    if not (directory / META_FILE).is_file():
        return None
    try:
        artifact = read_artifact(directory)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("edge export %s unreadable (%s); devices get a model after the next round",  # pragma: no mutate
                    directory, exc)  # pragma: no mutate
        return None
    inputs = {m: [spec.max_tokens, spec.token_dim] for m, spec in config.modalities.items()}
    if artifact.inputs != inputs or artifact.classes != config.num_classes:
        log.warning("edge export %s was made for another model (inputs %s, %d classes); "  # pragma: no mutate
                    "not sent to devices", directory, artifact.inputs, artifact.classes)  # pragma: no mutate
        return None
    return artifact


def written_version(directory: Path) -> int:
    """The version ``model.json`` names (0: none); read even when the model beside it is damaged, so the next
    export still gets a higher version than any a device may hold."""
    try:
        return int(json.loads((directory / META_FILE).read_text())["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def tiled(samples: Sequence[Sample], n: int) -> list[Sample]:
    return [samples[i % len(samples)] for i in range(n)]


class OnnxServing:
    """Owns the export/selection cycle and its report; the service only calls :meth:`refresh`."""

    def __init__(self, config: EdgeConfig, counters: Counters, serving: InferenceServer, *, opset: int = OPSET) -> None:
        self.config = config
        self.counters = counters
        self.serving = serving
        self.mode = config.training.onnx
        self.tol = config.training.onnx_parity_tol
        self.threads = config.training.onnx_threads
        self.min_interval_s = config.training.onnx_min_interval_s
        self._last_export_t: float | None = None
        self.opset = opset
        self.directory = config.state_path / EXPORT_DIR
        self.available = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))
        exporting = self.mode != "off" and self.available
        self.artifact: OnnxArtifact | None = last_export(self.directory, config.model) if exporting else None
        """The last model that passed its parity check (what devices may be sent); after a restart, the one
        on disk, so devices that register before the next round still get it."""
        self.next_version = written_version(self.directory) + 1
        """Export versions only grow, across restarts too (read back from ``model.json``)."""
        self.last: Evaluation | None = None
        if self.mode != "off" and not self.available:
            log.warning("edge %s: training.onnx is %r but onnx/onnxruntime are not installed "  # pragma: no mutate
                        "(megace[onnx]); serving torch", config.edge_id, self.mode)  # pragma: no mutate

    async def refresh(
        self,
        pool: Executor | None,
        trainer: Trainer | None,
        shared: Mapping[str, torch.Tensor],
        personal: Mapping[str, torch.Tensor],
        version: int,
    ) -> Evaluation | None:
        """Export and check the model the serving copy was just synced to (on ``pool``), then install."""
        if self.mode == "off" or not self.available or trainer is None:
            return None
        now = time.monotonic()
        if self._last_export_t is not None and now - self._last_export_t < self.min_interval_s:
            self.counters.inc("onnx_deferred")  # torch serves the newest weights until the next export
            return None
        self._last_export_t = now
        generation = self.serving.generation
        loop = asyncio.get_running_loop()
        evaluation = await loop.run_in_executor(
            pool, self.evaluate, trainer, shared, personal, max(version, 0), generation
        )
        self.install(evaluation, generation)
        return evaluation

    def evaluate(
        self,
        trainer: Trainer,
        shared: Mapping[str, torch.Tensor],
        personal: Mapping[str, torch.Tensor],
        version: int,
        generation: int | None = None,
    ) -> Evaluation:
        """Training thread: copy, time torch, export, check parity, write, time ONNX, choose. Never raises."""
        ev = Evaluation(version=version)
        if generation is not None and generation != self.serving.generation:
            ev.reason = "stale"
            return ev
        model_config = self.config.model
        samples = check_samples(trainer)
        one, many = samples[-1:], tiled(samples, 32)
        started = time.perf_counter()
        try:
            twin = personalized_copy(trainer.model, shared, personal)
            ev.timings["torch_ms_b1"] = median_ms(lambda: torch_probs(twin, one, model_config), REPS_B1)
            ev.timings["torch_ms_b32"] = median_ms(lambda: torch_probs(twin, many, model_config), REPS_B32)
            export_version, self.next_version = self.next_version, self.next_version + 1
            artifact = artifact_from_copy(
                twin, model_config, samples, version=export_version, global_version=version, threads=self.threads,
                opset=self.opset,
            )
        except Exception as exc:  # an exporter failure must never take serving down: torch keeps answering
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            ev.reason, ev.detail = "export", f"{type(exc).__name__}: {first}"  # (the exporter may add a graph dump)
            return ev
        ev.export_s = round(time.perf_counter() - started, 3)
        ev.timings["parity"] = artifact.parity
        if not artifact.parity <= self.tol:  # NaN fails too
            ev.reason, ev.detail = "parity", f"max abs difference {artifact.parity:.3g} > tolerance {self.tol:.3g}"
            return ev
        try:
            write_artifact(artifact, self.directory)
        except OSError as exc:
            ev.reason, ev.detail = "write", f"{type(exc).__name__}: {exc}"
            return ev
        ev.artifact = artifact
        ev.predictor = predictor = OnnxPredictor(artifact, model_config, self.threads)
        ev.timings["onnx_ms_b1"] = median_ms(lambda: predictor.predict(one), REPS_B1)
        ev.timings["onnx_ms_b32"] = median_ms(lambda: predictor.predict(many), REPS_B32)
        ev.backend, ev.reason = self._choose(ev.timings)
        return ev

    def _choose(self, timings: Mapping[str, float]) -> tuple[str, str]:
        if self.mode == "on":
            return "onnx", "forced"
        if self.config.training.inference_process:
            return "torch", "inference_process"
        return ("onnx", "faster") if timings["onnx_ms_b1"] < timings["torch_ms_b1"] else ("torch", "slower")

    def install(self, ev: Evaluation, generation: int) -> None:
        """Loop: publish the artifact and switch the server's backend, unless a newer sync came meanwhile."""
        if ev.reason != "stale" and generation != self.serving.generation:
            ev.reason, ev.backend, ev.predictor = "stale", "torch", None
        if ev.reason == "stale":
            self.counters.inc("onnx_stale")
            return
        self.last = ev
        if ev.rejected:
            self.counters.inc(f"onnx_rejected.{ev.reason}")
            log.warning("edge %s: ONNX model v%d rejected (%s: %s); serving torch",  # pragma: no mutate
                        self.config.edge_id, ev.version, ev.reason, ev.detail)  # pragma: no mutate
            return
        self.counters.inc("onnx_exports")
        self.artifact = ev.artifact
        self.serving.onnx = ev.predictor if ev.backend == "onnx" else None
        t = ev.timings
        log.info("edge %s: ONNX v%d parity %.2g, batch 1 %.2f ms (torch %.2f), batch 32 %.1f ms "  # pragma: no mutate
                 "(torch %.1f): serving %s (%s)", self.config.edge_id, ev.version, t["parity"],  # pragma: no mutate
                 t["onnx_ms_b1"], t["torch_ms_b1"], t["onnx_ms_b32"], t["torch_ms_b32"],  # pragma: no mutate
                 ev.backend, ev.reason)  # pragma: no mutate

    def metrics(self) -> dict[str, Any]:
        """Backend in use, served model version, the last check's parity and timings (JSON-safe)."""
        serving = self.serving
        active = serving.onnx or serving.predictor
        ev = self.last
        timings = ev.timings if ev is not None else {}
        return {
            "inference_backend": "onnx" if serving.onnx is not None else "torch",
            "model_version": active.version if active is not None else None,
            "onnx_mode": self.mode,
            "onnx_reason": ev.reason if ev is not None else (None if self.available else "unavailable"),
            "onnx_version": self.artifact.version if self.artifact is not None else None,
            "onnx_parity": timings.get("parity"),
            **{k: timings.get(k) for k in ("onnx_ms_b1", "torch_ms_b1", "onnx_ms_b32", "torch_ms_b32")},
            "onnx_export_s": ev.export_s if ev is not None else None,
        }


__all__ = ["MODES", "Evaluation", "OnnxPredictor", "OnnxServing", "check_samples", "median_ms", "synthetic_samples"]
