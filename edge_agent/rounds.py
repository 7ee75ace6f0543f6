"""The edge's training side: local rounds, applying globals, checkpoints and model refreshes.

A mixin of :class:`edge_agent.service.EdgeAgent`, kept apart so that the service module reads as
connect-run-shut-down. Everything here that touches the trainer runs on the one training thread
(``_train_pool``), in order: a global never lands in the middle of a round, and a checkpoint never sees
half of one.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from broker.aio import wait_event
from edge_agent import checkpoints, uploads
from edge_agent.core import ApplyJob
from edge_agent.model_push import publish_model
from megace_model.errors import AdapterMismatchError, InsufficientDataError

if TYPE_CHECKING:
    from broker.metrics import Counters
    from edge_agent.acks import DurableAcks
    from edge_agent.config import EdgeConfig
    from edge_agent.core import EdgeCore
    from edge_agent.downlinks import DownlinkQueue
    from edge_agent.onnx_serving import OnnxServing
    from edge_agent.outbox import Outbox
    from edge_agent.receiver_host import ReceiverHost
    from edge_agent.reporting import Reporter
    from edge_agent.serving import InferenceServer
    from edge_agent.state import AgentState, StateStore
    from edge_agent.training.trainer import Trainer
    from megace_model.onnx import OnnxArtifact

log = logging.getLogger(__name__)


class EdgeRounds:
    """Training, global application and checkpoints of the edge agent (the attributes are the agent's)."""

    config: EdgeConfig
    edge_id: str
    core: EdgeCore
    counters: Counters
    store: StateStore
    acks: DurableAcks
    outbox: Outbox
    downlinks: DownlinkQueue
    serving: InferenceServer
    onnx: OnnxServing
    reporter: Reporter
    receiver: ReceiverHost | None
    last_round: dict[str, Any]
    _train_pool: ThreadPoolExecutor | None
    _train_wake: asyncio.Event
    _subscribed_once: asyncio.Event
    _metrics_wake: asyncio.Event
    _closing: bool
    _last_round_t: float

    if TYPE_CHECKING:
        @property
        def state(self) -> AgentState: ...
        @property
        def trainer(self) -> Trainer | None: ...
        @property
        def model_artifact(self) -> OnnxArtifact | None: ...

    async def _apply(self, job: ApplyJob) -> None:
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(self._train_pool, self.core.apply, job.source, job.version,
                                                job.tensors)
        except (AdapterMismatchError, ValueError) as exc:
            self.downlinks.emit(self.core.reject(exc, None, None))
            return
        except Exception as exc:  # never let one adapter take the service down
            self.counters.inc("internal_errors")
            log.exception("edge %s: applying %s v%d failed", self.edge_id, job.source, job.version)
            self.downlinks.emit(self.core.reject(exc, None, None))
            return
        if result is None:
            self.counters.inc("global_stale")
            return
        await self.serving.sync(*result, job.version)  # counted applied once predictions use it too
        self.counters.inc("globals_applied")
        self.counters.inc(f"globals_applied.{job.source}")
        log.info("edge %s applied %s adapter v%d", self.edge_id, job.source, job.version)
        self.downlinks.emit(self.core.relay_feedback(job.version, job.stats, job.source))
        self._metrics_wake.set()
        await self._refresh_model(*result, job.version)

    async def _train_loop(self) -> None:
        t = self.config.training
        await wait_event(self._subscribed_once, t.startup_grace_s)  # let the retained global arrive first
        await asyncio.sleep(min(0.5, t.startup_grace_s))
        check = min(t.interval_s, 1.0)
        while not self._closing:
            await wait_event(self._train_wake, check)
            self._train_wake.clear()
            if self._closing:
                break
            new = self.core.new_samples
            waited = time.monotonic() - self._last_round_t
            if new >= t.min_new_samples or (new > 0 and waited >= t.interval_s):
                await self._round()

    async def _round(self) -> None:
        """One local round: train, checkpoint (with the upload in the outbox), then publish."""
        loop = asyncio.get_running_loop()
        new, self.core.new_samples = self.core.new_samples, 0
        self._last_round_t = time.monotonic()
        seq = None if self.config.training.local_only else self.state.upload_seq + 1
        try:
            metrics, payload, shared, personal = await loop.run_in_executor(
                self._train_pool, uploads.train_round, self.config, self.trainer, seq, self.state.global_version,
                self.core.signer)
        except InsufficientDataError:
            self.core.new_samples += new
            return
        except Exception:
            self.counters.inc("round_failures")
            log.exception("edge %s: training round failed", self.edge_id)
            return
        assert self.trainer is not None
        self.state.round = self.trainer.rounds
        self.last_round = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        self.counters.inc("rounds")
        new_upload = [] if payload is None or seq is None else [(seq, payload)]
        if new_upload:
            self.state.upload_seq = seq  # type: ignore[assignment]
        if await self._checkpoint(new_upload, export=True):
            self.outbox.extend(new_upload)
        log.info("edge %s round %d: loss %.4f train_acc %.3f heldout_acc %s (%d samples, %.2f s)", self.edge_id,
                 self.state.round, metrics["loss"], metrics["train_acc"], metrics["heldout_acc"], metrics["n_train"],
                 metrics["duration_s"])
        await self.serving.sync(shared, personal, self.state.global_version)
        self.reporter.round_done(self.state, metrics, payload, self.counters)
        await self._refresh_model(shared, personal, self.state.global_version)

    async def _refresh_model(self, shared: Any, personal: Any, version: int) -> None:
        """Export the served weights to ONNX (checked, maybe served) and send the model to devices that asked."""
        await self.onnx.refresh(self._train_pool, self.trainer, shared, personal, version)
        await publish_model(self.core, self.model_artifact, self.downlinks,
                            max_bytes=self.config.limits.model_push_max_bytes)

    async def _checkpoint(self, new_upload: list[tuple[int, bytes]] | None = None, *, export: bool = False) -> bool:
        """Persist a generation (off the loop); False (logged, counted) if the disk refused.

        The snapshot (state, registry, samples) and the ingest log's new segment are taken together on
        the loop, so a replay after this checkpoint starts exactly where its samples end."""
        segment = self.acks.mark()
        position = (segment, 0) if self.receiver is None else self.receiver.position
        self.state.ingest_segment, self.state.ingest_offset = position
        snap = checkpoints.snapshot(self.core, self.last_round, [*self.outbox, *(new_upload or [])])
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._train_pool, functools.partial(
                checkpoints.save, self.store, self.trainer, snap, export=export))
        except OSError:
            self.counters.inc("checkpoint_failures")
            log.exception("edge %s: checkpoint failed", self.edge_id)
            return False
        self.counters.inc("checkpoints")
        await self.acks.checkpointed(segment)
        if self.receiver is not None:
            self.receiver.checkpointed(position)
        return True


__all__ = ["EdgeRounds"]
