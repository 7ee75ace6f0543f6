"""The edge agent service: devices in, personalized LoRA training, adapters up, globals and predictions down.

Concurrency model (one asyncio loop, two explicit executors):

* connection loop: one aiomqtt client per connection attempt (``async with``), re-created with
  jittered backoff (:class:`broker.session.Session`); per connection it runs a receive loop,
  a downlink sender, the uploader and the metrics publisher;
* training executor (one thread): rounds, global-adapter application, checkpoints and the
  peft export. Everything that writes the trainer runs there, in order, so a global never
  lands in the middle of a round and a checkpoint never sees half of one;
* inference executor (one thread): batched forwards on the :class:`Predictor` copy, so a
  prediction never waits for a training step and never blocks ingest.

Bounded everywhere: aiomqtt's incoming queue (``limits.mqtt_queue``, drops are counted),
the inference queue (overflow answered ``busy``), the downlink queue (overflow counted),
the replay buffer (per device / modality / total caps) and the upload outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import os
import shutil
import time
from collections import deque
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import aiomqtt
import numpy as np
import torch

from broker import topics
from broker.aio import publish
from broker.errors import UnknownKindError, WireError
from broker.inbox import Inbox
from broker.metrics import Counters
from broker.session import Session, payload_bytes
from broker.wire import (
    AdapterUpdate,
    CapabilityProfile,
    DeviceFeedback,
    ErrorReport,
    FeatureRecord,
    GlobalAdapter,
    Kind,
    Prediction,
    SiteFeedback,
    Status,
    encode_envelope,
    metrics_payload,
)
from broker.wire.status import OFFLINE, ONLINE
from edge_agent.config import EdgeConfig
from edge_agent.errors import BusyError, IngestError, UnregisteredDeviceError
from edge_agent.inference import Predictor
from edge_agent.model.adapters import is_personal, load_personal
from edge_agent.model.errors import (
    AdapterMismatchError,
    BaseMismatchError,
    CheckpointError,
    EdgeModelError,
    InsufficientDataError,
    NonFiniteAdapterError,
)
from edge_agent.model.export import export_shared
from edge_agent.registry import DeviceRegistry
from edge_agent.state import AgentState, StateError, StateStore
from edge_agent.training.replay import ReplayBuffer
from edge_agent.training.trainer import Trainer
from megace_common.lora import add_peft_prefix, b_factor, is_lora_b, lora_scaling, rescale_b, strip_peft_prefix

log = logging.getLogger(__name__)

UPLINK_KINDS = {"register": Kind.REGISTER, "features": Kind.FEATURES, "infer": Kind.INFER}


@dataclass(slots=True)
class _InferRequest:
    device: str
    sample_id: int
    sample: dict[str, Any]
    received: float


class EdgeAgent:
    """One edge: ``await EdgeAgent(config).run(stop)``; returns after a clean shutdown once ``stop`` is set."""

    def __init__(self, config: EdgeConfig) -> None:
        self.config = config
        self.site = config.site
        self.edge_id = config.edge_id
        self.counters = Counters()
        self.store = StateStore(config.state_dir)
        self.state = AgentState()
        self.registry = DeviceRegistry(config.model, max_devices=config.limits.max_devices)
        self.trainer: Trainer | None = None
        self.predictor: Predictor | None = None
        self.outbox: deque[tuple[int, bytes]] = deque()
        self.last_round: dict[str, Any] = {}
        self.ready = asyncio.Event()
        """Set once state is restored and the first subscription is in place (tests, launchers)."""
        self.connected = asyncio.Event()
        self._inbox = Inbox(
            max_payload=config.limits.max_payload,
            channels=frozenset({topics.Channel.DEVICE_UP, topics.Channel.GLOBAL_DOWN, topics.Channel.SITE_FEEDBACK}),
        )
        self._infer_q: asyncio.Queue[_InferRequest] = asyncio.Queue(maxsize=config.limits.infer_queue)
        self._downlinks: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(maxsize=config.limits.downlink_queue)
        self._train_wake = asyncio.Event()
        self._outbox_wake = asyncio.Event()
        self._metrics_wake = asyncio.Event()
        self._subscribed_once = asyncio.Event()
        self._client: aiomqtt.Client | None = None
        self._closing = False
        self._new_samples = 0
        self._last_round_t = time.monotonic()
        self._down_seq = 0
        self._rate_mark = (time.monotonic(), 0)
        self._ingest_rate = 0.0
        self._modalities_seen: dict[str, int] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._train_pool: ThreadPoolExecutor | None = None
        self._infer_pool: ThreadPoolExecutor | None = None
        self._last_log: dict[str, float] = {}
        self._infer_latency_ms = 0.0
        self._status_topic = topics.status(topics.Role.EDGE, self.edge_id)
        self._metrics_topic = topics.metrics(topics.Role.EDGE, self.edge_id)
        self._filters = [
            *topics.subscriptions(topics.site_device_uplinks(self.site)),
            *topics.subscriptions(topics.global_down()),
            *topics.subscriptions(topics.site_feedback(self.site)),
        ]

    # ================================================================== lifecycle
    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Restore, connect, serve until ``stop`` is set, then shut down cleanly (checkpoint, offline status)."""
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        self._train_pool = ThreadPoolExecutor(1, thread_name_prefix=f"megace-train-{self.edge_id}")
        self._infer_pool = ThreadPoolExecutor(1, thread_name_prefix=f"megace-infer-{self.edge_id}")
        tasks: list[asyncio.Task[Any]] = []
        try:
            await loop.run_in_executor(self._train_pool, self._build_sync)
            _freeze_startup_heap()
            tasks = [
                asyncio.create_task(self._connection_loop(), name="edge-connection"),
                asyncio.create_task(self._train_loop(), name="edge-training"),
                asyncio.create_task(self._infer_worker(), name="edge-inference"),
            ]
            stopper = asyncio.create_task(stop.wait(), name="edge-stop")
            done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            failed = [t for t in done if t is not stopper and not t.cancelled() and t.exception()]
            await self._shutdown(tasks)
            if failed:
                raise failed[0].exception()  # type: ignore[misc]
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._train_pool.shutdown(wait=True)
            self._infer_pool.shutdown(wait=True)

    async def _shutdown(self, tasks: list[asyncio.Task[Any]]) -> None:
        """Finish the running round, checkpoint, flush uploads, announce offline, disconnect."""
        log.info("edge %s shutting down", self.edge_id)
        self._closing = True
        self._train_wake.set()
        connection, training, inference = tasks
        with contextlib.suppress(asyncio.CancelledError):
            await training  # a round in progress completes (and is checkpointed) first
        inference.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self._checkpoint()
        client = self._client
        if client is not None and self.connected.is_set():
            deadline = time.monotonic() + self.config.limits.shutdown_flush_s
            while (self.outbox or not self._downlinks.empty()) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            with contextlib.suppress(aiomqtt.MqttError, asyncio.TimeoutError):
                await client.publish(self._metrics_topic, self._metrics_payload(), qos=0)
                await client.publish(self._status_topic, self._status(OFFLINE), qos=1, retain=True, timeout=2.0)
        connection.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await connection
        log.info("edge %s stopped (round %d, upload seq %d)", self.edge_id, self.state.round, self.state.upload_seq)

    def _build_sync(self) -> None:
        """Build the trainer (slow: model construction) and restore the last checkpoint; training thread."""
        t, lim = self.config.training, self.config.limits
        if t.torch_threads:
            torch.set_num_threads(t.torch_threads)
        buffer = ReplayBuffer(max_total=lim.replay_max_total, max_per_device=lim.replay_max_per_device,
                              max_per_modality=lim.replay_max_per_modality)
        device = None if t.device == "auto" else t.device
        self.trainer = Trainer(self.config.model, buffer=buffer, lr=t.lr, weight_decay=t.weight_decay,
                               holdout_every=t.holdout_every, device=device)
        self._restore_sync()
        self.predictor = Predictor(self.trainer.model, self.config.model, self.trainer.device)
        self.predictor.version = max(self.state.global_version, 0)

    def _restore_sync(self) -> None:
        """Load the newest verifiable generation; corrupt ones are logged, counted and skipped."""
        assert self.trainer is not None
        confirmed = self.store.confirmed()
        corrupt = False
        for gen_dir in self.store.candidates():
            try:
                gen = self.store.read(gen_dir)
                self.trainer.load_checkpoint(gen.trainer_dir)
            except (StateError, CheckpointError) as exc:
                log.error("edge %s: checkpoint %s unusable (%s); trying an older one", self.edge_id, gen_dir, exc)
                self.counters.inc("checkpoint_corrupt")
                self.counters.reject(exc)
                corrupt = True
                continue
            self.trainer.buffer.restore(gen.samples)
            self.registry.load_dict(gen.registry)
            self.state = gen.state
            for name, value in gen.state.totals.items():
                self.counters.inc(name, int(value))
            self.last_round = dict(gen.state.last_round)
            self.outbox.extend((seq, payload) for seq, payload in gen.outbox if seq > confirmed)
            log.info("edge %s: resumed from %s (round %d, upload seq %d, %d samples, %d pending uploads)",
                     self.edge_id, gen_dir.name, self.state.round, self.state.upload_seq, len(gen.samples),
                     len(self.outbox))
            break
        else:
            if self.store.has_state():
                log.error("edge %s: no usable checkpoint under %s; starting fresh", self.edge_id, self.store.root)
                corrupt = True
        self.state.upload_seq = max(self.state.upload_seq, confirmed)
        if corrupt:
            # Seqs after the last readable generation may have been published with other content:
            # jump past anything this edge could have used (the cloud counts it as a gap, not a replay).
            self.state.upload_seq = max(self.state.upload_seq, time.time_ns() // 1_000_000)

    # ================================================================ connection
    async def _connection_loop(self) -> None:
        """Connect forever; a fresh client per attempt, backoff reset after every healthy session."""
        will = aiomqtt.Will(self._status_topic, self._status(OFFLINE), qos=1, retain=True)
        session = Session(
            self.config.address, self._session, identifier=f"megace-edge-{self.edge_id}", counters=self.counters,
            will=will, clean_session=not self.config.persistent_session,
            max_queued_incoming=self.config.limits.mqtt_queue, name=f"edge {self.edge_id}",
        )
        await session.run()

    async def _session(self, client: aiomqtt.Client, attempt: int = 0) -> None:
        await client.subscribe([(f, 1) for f in self._filters])
        await client.publish(self._status_topic, self._status(ONLINE), qos=1, retain=True)
        self._client = client
        self.connected.set()
        self._subscribed_once.set()
        self.ready.set()
        tasks = [
            asyncio.create_task(self._receive(client), name="edge-receive"),
            asyncio.create_task(self._send_downlinks(client), name="edge-downlinks"),
            asyncio.create_task(self._uploader(client), name="edge-uploader"),
            asyncio.create_task(self._metrics_loop(client), name="edge-metrics"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            self.connected.clear()
            self._client = None
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # =================================================================== receive
    async def _receive(self, client: aiomqtt.Client) -> None:
        inc, handle = self.counters.inc, self.handle
        async for message in client.messages:
            payload = payload_bytes(message.payload)
            inc("bytes_down", len(payload))
            inc("messages_in")
            handle(message.topic.value, payload, retained=bool(message.retain))

    def handle(self, topic: str, payload: bytes, *, retained: bool = False) -> None:
        """Process one MQTT message (synchronous and cheap; heavy work is handed to executors)."""
        parsed = None
        env = None
        try:
            got = self._inbox.accept(topic, payload)
            if got is None:
                return  # a chunk of an unfinished transfer
            parsed, env = got
            channel = parsed.channel
            if channel is topics.Channel.DEVICE_UP:
                expected = UPLINK_KINDS[parsed.what or ""]
                if env.kind is not expected:
                    raise UnknownKindError(f"{parsed.what} topic carries a {env.kind.value!r} envelope")
                device = parsed.device or ""
                if expected is Kind.FEATURES:
                    self._on_features(device, env.seq, env.body)
                elif expected is Kind.INFER:
                    self._on_infer(device, env.seq, env.body)
                else:
                    self._on_register(device, env.seq, env.body, retained=retained)
            elif channel is topics.Channel.GLOBAL_DOWN:
                if env.kind is not Kind.GLOBAL:
                    raise UnknownKindError(f"global topic carries a {env.kind.value!r} envelope")
                self._on_global(GlobalAdapter.from_body(env.body))
            elif channel is topics.Channel.SITE_FEEDBACK:
                if env.kind is not Kind.SITE_FEEDBACK:
                    raise UnknownKindError(f"feedback topic carries a {env.kind.value!r} envelope")
                self._on_site_feedback(SiteFeedback.from_body(env.body))
            else:
                self.counters.inc("ignored")
        except (WireError, IngestError, EdgeModelError) as exc:
            device = self._device_of(topic, parsed)
            self._reject(exc, device, env.seq if env is not None else None)
        except Exception as exc:  # a bug must cost one message, not the service
            self.counters.inc("internal_errors")
            log.exception("edge %s: internal error on %s", self.edge_id, topic)
            self._reject(exc, self._device_of(topic, parsed), env.seq if env is not None else None)

    @staticmethod
    def _device_of(topic: str, parsed: topics.Parsed | None) -> str | None:
        if parsed is None:
            try:
                parsed = topics.parse(topic)
            except WireError:
                return None
        return parsed.device if parsed.channel is topics.Channel.DEVICE_UP else None

    def _reject(self, exc: BaseException, device: str | None, ref: int | None) -> None:
        """Count by class, log (rate-limited), and tell the device why when there is one to tell."""
        self.counters.reject(exc)
        name = type(exc).__name__
        now = time.monotonic()
        if now - self._last_log.get(name, 0.0) > 5.0:
            self._last_log[name] = now
            log.warning("edge %s rejected input%s: %s: %s", self.edge_id, f" from {device}" if device else "",
                        name, exc)
        if device is not None:
            entry = self.registry.devices.get(device)
            if entry is not None:
                entry.count("rejected")
            code = getattr(exc, "code", "malformed")
            self._send_down(device, Kind.ERROR, ErrorReport(code=code, message=f"{name}: {exc}"[:500], ref=ref))

    # ------------------------------------------------------------- device uplinks
    def _on_register(self, device: str, seq: int, body: Any, *, retained: bool) -> None:
        profile = CapabilityProfile.from_body(body)
        restarted = not retained and any(g.last.get(device, -1) >= seq for g in self.registry.guards.values())
        entry = self.registry.register(device, profile, fresh=restarted)
        self.counters.inc("registrations")
        self._send_down(device, Kind.CONFIG, entry.config(model_version=max(self.state.global_version, 0)))

    def _on_features(self, device: str, seq: int, body: Any) -> None:
        registry = self.registry
        entry = registry.devices.get(device)
        if entry is None:
            raise UnregisteredDeviceError(f"device {device!r} is not registered; publish a registration first")
        if not registry.is_new("features", device, seq):
            self.counters.inc("duplicates")
            return
        record = FeatureRecord.from_body(body, max_array_bytes=self.config.limits.max_array_bytes)
        sample = registry.check(device, record, need_label=True)
        entry.count("records")
        label = sample["label"]
        if label is None:
            self.counters.inc("unlabeled")
            return
        assert self.trainer is not None
        # registry.check already enforced what Trainer.add_sample would re-check (known modality,
        # token width, finite values, label range): buffer directly, this is the ingest hot path
        modalities = sample["modalities"]
        self.trainer.buffer.add(device, modalities, int(label))
        self.counters.inc("samples_total")
        seen = self._modalities_seen
        for name in modalities:
            seen[name] = seen.get(name, 0) + 1
        self._new_samples += 1
        if self._new_samples >= self.config.training.min_new_samples:
            self._train_wake.set()

    def _on_infer(self, device: str, seq: int, body: Any) -> None:
        if device not in self.registry:
            raise UnregisteredDeviceError(f"device {device!r} is not registered; publish a registration first")
        if not self.registry.is_new("infer", device, seq):
            self.counters.inc("duplicates")
            return
        record = FeatureRecord.from_body(body, max_array_bytes=self.config.limits.max_array_bytes)
        sample = self.registry.check(device, record, need_label=False)
        try:
            self._infer_q.put_nowait(_InferRequest(device, record.sample, sample, time.perf_counter()))
        except asyncio.QueueFull:
            raise BusyError(f"{self._infer_q.maxsize} inference requests already waiting") from None
        self.counters.inc("infer_requests")

    # ------------------------------------------------------------ cloud downlinks
    def _on_global(self, msg: GlobalAdapter) -> None:
        if self.config.training.local_only:
            self.counters.inc("global_ignored")
            return
        assert self.trainer is not None
        if msg.base_model != self.trainer.fingerprint:
            raise BaseMismatchError(f"global v{msg.version} was made for base {msg.base_model[:12]}..., "
                                    f"this edge runs {self.trainer.fingerprint[:12]}...")
        if msg.version <= self.state.global_version:
            self.counters.inc("global_stale")
            return
        if msg.rank != self.config.model.lora_r:
            self.counters.inc("global_other_rank")  # this edge waits for its site's rank-truncated view
            return
        tensors = {k: np.array(v) for k, v in msg.tensors.items()}  # wire arrays are read-only views
        sent = lora_scaling(msg.alpha, msg.rank)
        own = lora_scaling(self.config.model.lora_alpha, self.config.model.lora_r)
        if not math.isclose(b_factor(sent, own), 1.0):
            tensors = {k: (rescale_b(v.astype(np.float32), sent, own) if is_lora_b(k) else v)
                       for k, v in tensors.items()}
        self._spawn(self._apply("global", msg.version, tensors, {}))

    def _on_site_feedback(self, msg: SiteFeedback) -> None:
        if msg.site != self.site:
            self.counters.inc("ignored")
            return
        if self.config.training.local_only:
            self.counters.inc("global_ignored")
            return
        for rejection in msg.rejected:
            self.counters.inc("uploads_refused_by_cloud")
            log.warning("edge %s: cloud refused upload %d: %s", self.edge_id, rejection.seq, rejection.reason)
        stats = {k: float(v) for k, v in msg.stats.items()}
        if msg.tensors and msg.rank == self.config.model.lora_r:
            self._spawn(self._apply("view", msg.version, {k: np.array(v) for k, v in msg.tensors.items()}, stats))
        else:
            self._relay_feedback(msg.version, stats, "feedback")

    async def _apply(self, source: str, version: int, tensors: dict[str, np.ndarray], stats: dict[str, float]) -> None:
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(self._train_pool, self._apply_sync, source, version, tensors)
        except (AdapterMismatchError, ValueError) as exc:
            self._reject(exc, None, None)
            return
        except Exception as exc:  # never let one adapter take the service down
            self.counters.inc("internal_errors")
            log.exception("edge %s: applying %s v%d failed", self.edge_id, source, version)
            self._reject(exc, None, None)
            return
        if result is None:
            self.counters.inc("global_stale")
            return
        self.counters.inc("globals_applied")
        self.counters.inc(f"globals_applied.{source}")
        log.info("edge %s applied %s adapter v%d", self.edge_id, source, version)
        await self._sync_predictor(*result, version)
        self._relay_feedback(version, stats, source)
        self._metrics_wake.set()

    def _apply_sync(
        self, source: str, version: int, tensors: dict[str, np.ndarray]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
        """Install a global (or the site's view of it); training thread. None if superseded meanwhile.

        The view of the same version is preferred over the global (it is cut to this edge's rank).
        Validation happens before anything is written, so a bad adapter leaves the model untouched.
        """
        trainer = self.trainer
        assert trainer is not None
        current, current_source = self.state.global_version, self.state.global_source
        if version < current or (version == current and not (source == "view" and current_source == "global")):
            return None
        shared = {k: v for k, v in tensors.items() if not is_personal(k)}
        personal = {strip_peft_prefix(k): v for k, v in tensors.items() if is_personal(k)}
        if personal and self.config.training.share_personal:
            _check_like(trainer.personal_state(), personal)
        else:
            personal = {}
        trainer.apply_global(shared, strict=source != "view")  # a view may omit modules (see Trainer)
        if personal:
            load_personal(trainer.model, {k: torch.from_numpy(np.array(v, dtype=np.float32))
                                          for k, v in personal.items()})
        self.state.global_version, self.state.global_source = version, source
        return trainer.shared_state(), trainer.personal_state()

    def _relay_feedback(self, version: int, stats: dict[str, float], message: str) -> None:
        feedback = DeviceFeedback(global_version=version, metrics=stats, message=message)
        for device in list(self.registry.devices):
            self._send_down(device, Kind.FEEDBACK, feedback)
        self.counters.inc("feedback_relayed")

    # ================================================================ inference
    async def _infer_worker(self) -> None:
        """Batch whatever requests are waiting into one forward on the predictor copy."""
        loop = asyncio.get_running_loop()
        limit = self.config.limits.infer_batch
        while True:
            batch = [await self._infer_q.get()]
            while len(batch) < limit:
                try:
                    batch.append(self._infer_q.get_nowait())
                except asyncio.QueueEmpty:
                    break
            predictor = self.predictor
            assert predictor is not None
            try:
                results = await loop.run_in_executor(self._infer_pool, predictor.predict, [r.sample for r in batch])
            except EdgeModelError as exc:
                for request in batch:
                    self._reject(exc, request.device, None)
                continue
            now = time.perf_counter()
            for request, (label, probs) in zip(batch, results, strict=True):
                self._send_down(request.device, Kind.PREDICTION,
                                Prediction(request.device, request.sample_id, label, probs, predictor.version))
                self.counters.inc("predictions")
            self._infer_latency_ms = (now - batch[0].received) * 1000

    async def _sync_predictor(
        self, shared: Mapping[str, torch.Tensor], personal: Mapping[str, torch.Tensor], version: int
    ) -> None:
        predictor = self.predictor
        assert predictor is not None
        await asyncio.get_running_loop().run_in_executor(self._infer_pool, predictor.sync, shared, personal,
                                                         max(version, 0))

    # ================================================================= training
    async def _train_loop(self) -> None:
        t = self.config.training
        with contextlib.suppress(asyncio.TimeoutError):  # give the retained global a chance to arrive first
            await asyncio.wait_for(self._subscribed_once.wait(), timeout=t.startup_grace_s)
        await asyncio.sleep(min(0.5, t.startup_grace_s))
        check = min(t.interval_s, 1.0)
        while not self._closing:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._train_wake.wait(), timeout=check)
            self._train_wake.clear()
            if self._closing:
                break
            new = self._new_samples
            waited = time.monotonic() - self._last_round_t
            if new >= t.min_new_samples or (new > 0 and waited >= t.interval_s):
                await self._round()

    async def _round(self) -> None:
        """One local round: train, checkpoint (with the upload in the outbox), then publish."""
        loop = asyncio.get_running_loop()
        new, self._new_samples = self._new_samples, 0
        self._last_round_t = time.monotonic()
        seq = None if self.config.training.local_only else self.state.upload_seq + 1
        try:
            metrics, payload, shared, personal = await loop.run_in_executor(self._train_pool, self._round_sync, seq)
        except InsufficientDataError:
            self._new_samples += new
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
            while len(self.outbox) > self.config.limits.max_pending_uploads:
                self.outbox.popleft()
                self.counters.inc("uploads_dropped")
            self._outbox_wake.set()
        log.info("edge %s round %d: loss %.4f train_acc %.3f heldout_acc %s (%d samples, %.2f s)", self.edge_id,
                 self.state.round, metrics["loss"], metrics["train_acc"], metrics["heldout_acc"], metrics["n_train"],
                 metrics["duration_s"])
        await self._sync_predictor(shared, personal, self.state.global_version)
        self._metrics_wake.set()

    def _round_sync(self, seq: int | None) -> tuple[dict[str, Any], bytes | None, dict[str, Any], dict[str, Any]]:
        """Training thread: train, then build the upload envelope (bytes are what gets persisted and sent)."""
        trainer = self.trainer
        assert trainer is not None
        t = self.config.training
        metrics = trainer.train_round(steps=t.steps, epochs=t.epochs, batch_size=t.batch_size)
        shared, personal = trainer.shared_state(), trainer.personal_state()
        payload = None
        if seq is not None:
            dtype = torch.float16 if t.upload_fp16 else torch.float32
            tensors = {k: v.to(dtype).numpy() for k, v in shared.items()}
            if t.share_personal:
                tensors.update({add_peft_prefix(k): v.to(dtype).numpy() for k, v in personal.items()})
            numbers = {k: float(metrics[k]) for k in ("loss", "ce_loss", "contrastive_loss", "train_acc",
                                                      "heldout_acc", "n_train", "n_heldout", "steps", "duration_s")
                       if metrics.get(k) is not None and math.isfinite(float(metrics[k]))}
            update = AdapterUpdate(
                edge=self.edge_id, site=self.site, seq=seq, base_version=max(self.state.global_version, 0),
                base_model=trainer.fingerprint, rank=self.config.model.lora_r,
                alpha=float(self.config.model.lora_alpha),
                samples=int(metrics["n_train"]), modalities=dict(trainer.buffer.counts()["modalities"]),
                tensors=tensors, metrics=numbers,
            )
            payload = encode_envelope(Kind.ADAPTER, self.edge_id, seq, update.to_body())
        return metrics, payload, shared, personal

    async def _checkpoint(self, new_upload: list[tuple[int, bytes]] | None = None, *, export: bool = False) -> bool:
        """Persist a generation (off the loop); False (logged, counted) if the disk refused."""
        self.state.totals = {k: int(v) for k, v in self.counters.snapshot().items() if isinstance(v, int)}
        self.state.last_round = dict(self.last_round)
        state = AgentState(**asdict(self.state))
        registry = self.registry.to_dict()
        outbox = [*self.outbox, *(new_upload or [])]
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._train_pool, self._checkpoint_sync, state, registry, outbox, export)
        except OSError:
            self.counters.inc("checkpoint_failures")
            log.exception("edge %s: checkpoint failed", self.edge_id)
            return False
        self.counters.inc("checkpoints")
        return True

    def _checkpoint_sync(
        self, state: AgentState, registry: dict[str, Any], outbox: list[tuple[int, bytes]], export: bool
    ) -> None:
        trainer = self.trainer
        assert trainer is not None
        self.store.save(trainer=trainer, state=state, registry=registry, samples=trainer.buffer.snapshot(),
                        outbox=outbox)
        if export:
            target = self.store.root / "adapter"
            fresh, old = target.with_name("adapter.new"), target.with_name("adapter.old")
            shutil.rmtree(fresh, ignore_errors=True)
            export_shared(trainer.model, fresh)
            shutil.rmtree(old, ignore_errors=True)
            if target.exists():
                os.replace(target, old)
            os.replace(fresh, target)
            shutil.rmtree(old, ignore_errors=True)

    # ================================================================ outbound
    def _send_down(self, device: str, kind: Kind, message: Any) -> None:
        """Queue a message for a device's downlink; drops (counted) rather than grow without bound."""
        self._down_seq += 1
        topic = topics.device_down(self.site, device, topics.Downlink(kind.value))
        payload = encode_envelope(kind, self.edge_id, self._down_seq, message.to_body())
        try:
            self._downlinks.put_nowait((topic, payload))
        except asyncio.QueueFull:
            self.counters.inc("downlink_dropped")

    async def _send_downlinks(self, client: aiomqtt.Client, window: int = 64) -> None:
        """Publish queued downlinks at QoS 1 with up to ``window`` awaiting their PUBACK (order kept)."""
        slots = asyncio.Semaphore(window)
        pending: set[asyncio.Task[None]] = set()

        async def one(topic: str, payload: bytes) -> None:
            try:
                await client.publish(topic, payload, qos=1)
                self.counters.inc("bytes_up", len(payload))
            finally:
                slots.release()

        try:
            while True:
                topic, payload = await self._downlinks.get()
                await slots.acquire()
                task = asyncio.create_task(one(topic, payload))
                pending.add(task)
                task.add_done_callback(pending.discard)
                for t in [t for t in pending if t.done() and not t.cancelled() and t.exception()]:
                    raise t.exception()  # type: ignore[misc]
        finally:
            for task in pending:
                task.cancel()

    async def _uploader(self, client: aiomqtt.Client) -> None:
        """Publish durable uploads in seq order; an upload leaves the outbox only once the broker acked it."""
        topic = topics.adapter_up(self.site)
        while True:
            self._outbox_wake.clear()
            while self.outbox:
                seq, payload = self.outbox[0]
                sent = await publish(client, topic, payload, sender=self.edge_id, seq=seq, qos=1,
                                     max_packet=self.config.limits.max_packet)
                if self.outbox and self.outbox[0][0] == seq:
                    self.outbox.popleft()
                self.store.confirm(seq)
                self.counters.inc("uploads")
                self.counters.inc("bytes_up", sent)
                log.info("edge %s uploaded adapter seq %d (%d bytes)", self.edge_id, seq, sent)
                self._metrics_wake.set()
            await self._outbox_wake.wait()

    async def _metrics_loop(self, client: aiomqtt.Client) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._metrics_wake.wait(), timeout=self.config.metrics_interval_s)
            self._metrics_wake.clear()
            await client.publish(self._metrics_topic, self._metrics_payload(), qos=0)

    # ================================================================= reporting
    def metrics(self) -> dict[str, Any]:
        """Everything the dashboard and the closed-loop progress table read (JSON-safe)."""
        snap = self.counters.snapshot()
        now = time.monotonic()
        mark_t, mark_n = self._rate_mark
        total = int(snap.get("samples_total", 0))
        if now - mark_t >= 0.5:
            self._ingest_rate = (total - mark_n) / (now - mark_t)
            self._rate_mark = (now, total)
        buffer = self.trainer.buffer if self.trainer is not None else None

        def num(key: str) -> float | None:
            value = self.last_round.get(key)
            return None if value is None or not math.isfinite(float(value)) else float(value)

        rejected = {k.split(".", 1)[1]: v for k, v in snap.items() if k.startswith("rejected.")}
        return {
            **snap,
            "edge": self.edge_id,
            "site": self.site,
            "round": self.state.round,
            "global_version": self.state.global_version,
            "global_source": self.state.global_source,
            "upload_seq": self.state.upload_seq,
            "samples_total": total,
            "train_loss": num("loss"),
            "train_acc": num("train_acc"),
            "heldout_acc": num("heldout_acc"),
            "bytes_up": int(snap.get("bytes_up", 0)),
            "bytes_down": int(snap.get("bytes_down", 0)),
            "uploads": int(snap.get("uploads", 0)),
            "predictions": int(snap.get("predictions", 0)),
            "rejected": int(snap.get("rejected", 0)),
            "rejected_by_class": rejected,
            "ingest_rate": round(self._ingest_rate, 2),
            "rank": self.config.model.lora_r,
            "modalities": dict(self._modalities_seen),
            "devices": len(self.registry),
            "buffer": len(buffer) if buffer is not None else 0,
            "buffer_dropped": buffer.dropped.get("all", 0) if buffer is not None else 0,
            "outbox": len(self.outbox),
            "infer_queue": self._infer_q.qsize(),
            "downlink_queue": self._downlinks.qsize(),
            "infer_latency_ms": round(self._infer_latency_ms, 3),
            "connected": self.connected.is_set(),
            "local_only": self.config.training.local_only,
            "share_personal": self.config.training.share_personal,
        }

    def _metrics_payload(self) -> bytes:
        return metrics_payload(topics.Role.EDGE.value, self.edge_id, self.metrics())

    def _status(self, state: str) -> bytes:
        model = self.config.model
        detail = {"site": self.site, "rank": model.lora_r, "backbone": model.backbone,
                  "modalities": list(model.modality_names), "pid": os.getpid()}
        return Status(role=topics.Role.EDGE.value, id=self.edge_id, state=state, detail=detail).encode()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


_heap_frozen = False


def _freeze_startup_heap() -> None:
    """Move everything alive after the first model build (torch, transformers, the model: ~400k objects)
    out of the cyclic GC's reach, once per process.

    Every full collection otherwise walks that whole heap (~0.4 s on a small CPU), and the ingest path's
    churn (replay-buffer samples replaced continually) triggers one every few ten thousand records.
    Collected once first, so no garbage is frozen with it.
    """
    global _heap_frozen
    if not _heap_frozen:
        _heap_frozen = True
        gc.collect()
        gc.freeze()


def _check_like(reference: Mapping[str, torch.Tensor], given: Mapping[str, Any]) -> None:
    """Personal tensors from the cloud (share_personal baseline) must match names, shapes and be finite."""
    if set(given) != set(reference):
        raise AdapterMismatchError(f"personal tensors differ: {sorted(set(given) ^ set(reference))[:5]}")
    for name, value in given.items():
        array = np.asarray(value)
        if tuple(array.shape) != tuple(reference[name].shape):
            raise AdapterMismatchError(f"{name}: shape {array.shape} != {tuple(reference[name].shape)}")
        if not np.isfinite(array).all():
            raise NonFiniteAdapterError(f"{name}: contains NaN or infinite values")


__all__ = ["EdgeAgent"]
