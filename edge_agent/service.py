"""The edge agent service: devices in, personalized LoRA training, adapters up, globals and predictions down.

This module connects, runs and shuts down; the work is done by collaborators:
:mod:`edge_agent.core` (message handling, network-free: messages in, what to send and schedule out),
:mod:`edge_agent.serving` (inference queue and batching), :mod:`edge_agent.downlinks` (the device
downlink queue and its sender), :mod:`edge_agent.uploads` (a round's upload and the outbox that sends
it), :mod:`edge_agent.checkpoints` (trainer build, restore, save, peft export) and
:mod:`edge_agent.reporting` (metrics and status); the training side (rounds, globals, checkpoints) is the
:class:`edge_agent.rounds.EdgeRounds` mixin.

Concurrency model (one asyncio loop, two explicit executors):

* connection loop: one aiomqtt client per connection attempt (``async with``), re-created with
  jittered backoff (:class:`broker.session.Session`); per connection it runs a receive loop,
  a downlink sender, the uploader and the metrics publisher;
* training executor (one thread): rounds, global-adapter application, checkpoints, the peft and
  ONNX exports (:mod:`edge_agent.onnx_serving`). Everything that writes the trainer runs there, in
  order, so a global never lands in the middle of a round and a checkpoint never sees half of one;
* inference executor (one thread): batched forwards on the :class:`Predictor` copy (or, with
  ``training.inference_process``, on a copy in a child process), so a
  prediction never waits for a training step and never blocks ingest.

By default (``ingest_receiver``) a receiver process (:mod:`edge_agent.receiver`, supervised by
:mod:`edge_agent.receiver_host`) holds the data connection: it logs and acknowledges device uplinks on a
core of its own, and this loop ingests them from its log; this process's own connection (``megace-ctl-<id>``,
in the secure set-up its own identity: ``control_identity``) answers inference requests, where the model is,
and takes globals and feedback.

Bounded everywhere: aiomqtt's incoming queue (``limits.mqtt_queue``, drops are counted),
the inference queue (overflow answered ``busy``), the downlink queue (overflow counted),
the replay buffer (per device / modality / total caps) and the upload outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiomqtt

from broker import topics
from broker.exact_chunks import ExactChunks
from broker.metrics import Counters
from broker.session import Session, payload_bytes
from broker.wire.status import OFFLINE, ONLINE
from edge_agent import checkpoints
from edge_agent.acks import DurableAcks
from edge_agent.config import EdgeConfig
from edge_agent.core import EdgeCore, Effects
from edge_agent.downlinks import DownlinkQueue
from edge_agent.infer_worker import group_name, refused, sharing
from edge_agent.inference import Predictor
from edge_agent.inference_process import ProcessPredictor
from edge_agent.ingestlog import IngestLog
from edge_agent.model_push import publish_model
from edge_agent.onnx_serving import OnnxServing
from edge_agent.outbox import Outbox
from edge_agent.receipts import ReceiptTracker
from edge_agent.receiver import control_client_id, data_client_id
from edge_agent.receiver_host import ReceiverHost, infer_filters
from edge_agent.registry import DeviceRegistry
from edge_agent.reporting import IngestRate, Reporter, edge_metrics
from edge_agent.rounds import EdgeRounds
from edge_agent.serving import InferenceServer, make_predictor
from edge_agent.state import AgentState, StateStore
from edge_agent.training.trainer import Trainer
from edge_agent.worker_processes import WorkerProcesses
from megace_model.onnx import OnnxArtifact

log = logging.getLogger(__name__)


class EdgeAgent(EdgeRounds):
    """One edge: ``await EdgeAgent(config).run(stop)``; returns after a clean shutdown once ``stop`` is set."""

    def __init__(self, config: EdgeConfig) -> None:
        self.config = config
        self.site = config.site
        self.edge_id = config.edge_id
        self.counters = Counters()
        self.core = EdgeCore(config, self.counters)
        """Message handling, registry, state and trainer (network-free); see :mod:`edge_agent.core`."""
        self.store = StateStore(config.state_dir)
        self.reporter = Reporter(config, self.metrics)
        """Status, metrics and round events for dashboards; see :class:`edge_agent.reporting.Reporter`."""
        self._metrics_wake = self.reporter.wake
        self.outbox = Outbox(
            self.counters, self.store, edge_id=self.edge_id, topic=topics.adapter_up(self.site),
            limit=config.limits.max_pending_uploads, max_packet=config.limits.max_packet,
            on_sent=self._metrics_wake.set)
        """Checkpointed uploads awaiting the cloud's verdict; see :class:`edge_agent.outbox.Outbox`."""
        self.downlinks = DownlinkQueue(self.counters, maxsize=config.limits.downlink_queue,
                                       window=config.limits.downlink_window)
        self.receiver = ReceiverHost.for_agent(config, self.store.root / "ingest", self.counters, self._from_log,
                                               self._receiver_ready) if config.receiver_process else None
        """``ingest_receiver = "process"``: the receiver process and its log's reader (:mod:`edge_agent.receiver`)."""
        ack_log = "ingest" if self.receiver is None else "ingest-ctl"  # process: the receiver owns ingest/
        self.acks = DurableAcks(IngestLog(self.store.root / ack_log, fsync=config.ingest_fsync), self.counters)
        """Device messages are acknowledged to the broker only once logged; see :mod:`edge_agent.acks`."""
        self.receipts = ReceiptTracker.attach(self)  # a device's records, receipted after their commit
        self.last_round: dict[str, Any] = {}
        self.ready = asyncio.Event()
        """Set once state is restored and the first subscription is in place (tests, launchers)."""
        self.connected = asyncio.Event()
        self.serving = InferenceServer(self.core, self.downlinks.emit, queue=config.limits.infer_queue,
                                       batch=config.limits.infer_batch)
        self.onnx = OnnxServing(config, self.counters, self.serving)  # ONNX export and backend choice per sync
        self._train_wake = asyncio.Event()
        self._subscribed_once = asyncio.Event()
        self._client: aiomqtt.Client | None = None
        self._mqtt: Session | None = None
        self.workers = WorkerProcesses(config, config.inference_workers)
        """``inference_workers``: processes sharing the request topic (MQTT 5 only; :mod:`edge_agent.infer_worker`)."""
        self._receiver_task: asyncio.Task[None] | None = None
        self._closing = False
        self._last_round_t = time.monotonic()
        self._ingest_rate = IngestRate()
        self._background: set[asyncio.Task[Any]] = set()
        self._train_pool: ThreadPoolExecutor | None = None
        self._filters = [
            *topics.subscriptions(topics.site_device_uplinks(self.site)),
        ]
        self._exact = ExactChunks([topics.global_down(), topics.site_feedback(self.site)])
        """The retained global and feedback (and their chunks) by exact name: RabbitMQ delivers no retained
        message through a wildcard (:mod:`broker.exact_chunks`)."""
        if self.receiver is not None:  # register and features go to the receiver process; inference stays here
            device_up = topics.subscriptions(topics.site_device_uplinks(self.site))
            self._filters = [*infer_filters(self.site), *(f for f in self._filters if f not in device_up)]

    # Delegating views of what the core owns (tests, launchers, the metrics below).
    @property
    def state(self) -> AgentState:
        return self.core.state

    @state.setter
    def state(self, value: AgentState) -> None:
        self.core.state = value

    @property
    def predictor(self) -> Predictor | ProcessPredictor | None:
        return self.serving.predictor

    @property
    def model_artifact(self) -> OnnxArtifact | None:
        """The last exported ONNX model that passed its parity check (for devices), or None."""
        return self.onnx.artifact

    @property
    def registry(self) -> DeviceRegistry:
        return self.core.registry

    @property
    def trainer(self) -> Trainer | None:
        return self.core.trainer

    @trainer.setter
    def trainer(self, value: Trainer | None) -> None:
        self.core.trainer = value

    # ================================================================== lifecycle
    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Restore, connect, serve until ``stop`` is set, then shut down cleanly (checkpoint, offline status)."""
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        self._train_pool = ThreadPoolExecutor(1, thread_name_prefix=f"megace-train-{self.edge_id}")
        self.serving.pool = infer_pool = ThreadPoolExecutor(1, thread_name_prefix=f"megace-infer-{self.edge_id}")
        tasks: list[asyncio.Task[Any]] = []
        try:
            self.outbox.extend(await loop.run_in_executor(self._train_pool, self._build_sync))
            self.core.resume_downlink_seqs(self.store.downlinks_reserved(), self.store.reserve_downlinks)
            self._replay()
            if self.receiver is not None:
                self._receiver_task = asyncio.create_task(self.receiver.run(), name="edge-receiver")
            await publish_model(self.core, self.model_artifact, self.downlinks,
                                max_bytes=self.config.limits.model_push_max_bytes)  # the export a last run left
            checkpoints.freeze_startup_heap()
            tasks = [
                asyncio.create_task(self._connection_loop(), name="edge-connection"),
                asyncio.create_task(self._train_loop(), name="edge-training"),
                asyncio.create_task(self.serving.run(), name="edge-inference"),
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
            if self.receiver is not None:
                self.receiver.kill()  # only if a clean stop did not happen
            if self._receiver_task is not None:
                self._receiver_task.cancel()
                await asyncio.gather(self._receiver_task, return_exceptions=True)
            self._train_pool.shutdown(wait=True)
            self.acks.close()
            infer_pool.shutdown(wait=True)
            self.serving.close()
            await asyncio.to_thread(self.workers.close)

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
        if self.receiver is not None and self._receiver_task is not None:
            await self.receiver.stop()  # it logs and acknowledges what it holds; the host reads the log to its end
            await asyncio.gather(self._receiver_task, return_exceptions=True)
        await self._checkpoint()
        client = self._client
        if client is not None and self.connected.is_set():
            deadline = time.monotonic() + self.config.limits.shutdown_flush_s
            while (self.outbox.unsent or not self.downlinks.empty()) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            with contextlib.suppress(aiomqtt.MqttError, asyncio.TimeoutError):
                await self.reporter.publish(client)  # the last figures (and a round that ended after the last tick)
                await client.publish(self.reporter.status_topic, self.reporter.status(OFFLINE), qos=1, retain=True,
                                     timeout=2.0)
        connection.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await connection
        if self._background:  # a global that arrived meanwhile: applied while the training pool still runs
            await asyncio.gather(*self._background, return_exceptions=True)
        log.info("edge %s stopped (round %d, upload seq %d)", self.edge_id, self.state.round, self.state.upload_seq)

    def _build_sync(self) -> list[tuple[int, bytes]]:
        """Build the trainer (slow: model construction) and restore the last checkpoint; training thread.

        Returns the unconfirmed uploads of the restored generation, for the loop to put in the outbox."""
        self.trainer = checkpoints.build_trainer(self.config)
        pending: list[tuple[int, bytes]] = []
        self.last_round = checkpoints.restore(self.store, self.core, self.counters, pending)
        self.serving.predictor = make_predictor(self.trainer, self.config, max(self.state.global_version, 0))
        return pending

    # ================================================================ connection
    async def _connection_loop(self) -> None:
        """Connect forever; a fresh client per attempt, backoff reset after every healthy session."""
        will = self.reporter.will()
        self._mqtt = session = Session(
            self.config.control_address, self._session, counters=self.counters,
            identifier=data_client_id(self.edge_id) if self.receiver is None else control_client_id(self.edge_id),
            will=will, clean_session=not self.config.persistent_session,
            max_queued_incoming=self.config.limits.mqtt_queue, name=f"edge {self.edge_id}", manual_ack=True,
            max_inflight=self.config.limits.downlink_window,
        )
        await session.run()

    async def _session(self, client: aiomqtt.Client, attempt: int = 0) -> None:
        v5 = self._mqtt is not None and self._mqtt.negotiator.v5  # MQTT 5: requests through a shared subscription
        shared = v5 and self.config.joins_infer_group
        filters, stale = sharing(self._filters, self.site, group_name(self.config)) if v5 else (self._filters, [])
        if v5 and not shared:  # plain: and leave the group a durable session of ours may still be in
            filters, stale = self._filters, [f for f in filters if f.startswith("$share/")]
        wanted = [*filters, *self._exact.filters()]
        refused(wanted, await client.subscribe([(f, 1) for f in wanted]), self.counters, f"edge {self.edge_id}")
        if stale:  # what another session of this client id left: a request would come twice (the guard drops it)
            await client.unsubscribe(stale)
        self.workers.on_connected(v5, self.counters)
        if self.receiver is not None:  # "online" means device data has a subscriber: the receiver's, once it is
            await self.receiver.ready.wait()  # subscribed (a device that starts on our status loses nothing)
        await client.publish(self.reporter.status_topic, self.reporter.status(ONLINE), qos=1, retain=True)
        self.downlinks.emit([self.core.register_request()])  # devices answer live: retained may never reach us
        self._client = client
        self.connected.set()
        self._subscribed_once.set()
        self._mark_ready()
        tasks = [
            asyncio.create_task(self._receive(client), name="edge-receive"),
            asyncio.create_task(self.acks.run(client), name="edge-acks"),
            asyncio.create_task(self.downlinks.send(client), name="edge-downlinks"),
            asyncio.create_task(self.outbox.send(client), name="edge-uploader"),
            asyncio.create_task(self.reporter.run(client), name="edge-metrics"),
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
            self.acks.reset()

    # =================================================================== receive
    async def _receive(self, client: aiomqtt.Client) -> None:
        inc, ingest, dispatch, received = self.counters.inc, self.core.ingest, self._dispatch, self.acks.received
        async for message in client.messages:
            payload = payload_bytes(message.payload)
            inc("bytes_down", len(payload))
            inc("messages_in")
            topic = message.topic.value
            if self._exact.covers(topic):
                self._subscribe_more(client, self._exact.observe(topic, payload))
            if self.receiver is not None and self._overtakes(topic):
                self._spawn(self._after_registration(topic, payload, received(message, topic, payload, durable=False,
                                                                              hold=True)))
                continue
            fx = ingest(topic, payload, retained=bool(message.retain))
            release = received(message, topic, payload, durable=fx.durable, hold=bool(fx.infers))
            for request in fx.infers:
                request.done = release
            dispatch(fx)

    def _subscribe_more(self, client: aiomqtt.Client, filters: list[str]) -> None:
        """Subscribe to the chunk names a retained transfer announced beyond those subscribed (in the background:
        the receive loop must not wait for a SUBACK)."""
        if filters:
            task = asyncio.create_task(client.subscribe([(f, 1) for f in filters]), name="edge-subscribe-chunks")
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def _replay(self) -> None:
        """Re-ingest what was logged after the restored checkpoint (the loop's state as it was at a crash)."""
        since = self.state.ingest_segment
        if self.receiver is not None:
            self.receiver.seek(since, self.state.ingest_offset)  # its host reads (and ingests) from there
            return
        self.acks.log.advance_to(since)
        n = 0
        for topic, payload, retained in self.acks.log.replay(since, self.state.ingest_offset):
            self.core.ingest(topic, payload, retained=retained)  # its downlinks were sent before the crash
            n += 1
        if n:
            self.counters.inc("ingest_replayed", n)
            log.info("edge %s replayed %d logged messages since segment %d", self.edge_id, n, since)

    def _from_log(self, topic: str, payload: bytes, retained: bool) -> None:
        """A message the receiver process logged (and acknowledged): handled as if it had just arrived."""
        self.counters.inc("messages_in")
        self._dispatch(self.core.ingest(topic, payload, retained=retained))

    def _overtakes(self, topic: str) -> bool:
        """Process mode: an inference request from a device whose registration may still be in the receiver's log."""
        if not topic.endswith(topics.Uplink.INFER.value):
            return False
        try:
            device = topics.parse(topic).device
        except ValueError:  # a bad topic: the core rejects it (counted) as for any message
            return False
        return device is not None and device not in self.core.registry

    async def _after_registration(self, topic: str, payload: bytes, release: Any) -> None:
        """Answer the request once its device's registration came through the log (or, after a grace, as today:
        ``unregistered``); its acknowledgement waits, in order, as for any request."""
        device = topics.parse(topic).device
        assert self.receiver is not None
        await self.receiver.caught_up(lambda: device in self.core.registry)
        fx = self.core.ingest(topic, payload)
        for request in fx.infers:
            request.done = release
        if not fx.infers and release is not None:
            release()
        self._dispatch(fx)

    def _receiver_ready(self) -> None:
        """The receiver process (re)subscribed: ask the devices to register again, since answers to the request
        sent when this process subscribed may have reached no subscriber (RabbitMQ keeps no retained copy we
        could read through the receiver's wildcard)."""
        self.downlinks.emit([self.core.register_request()])
        self._mark_ready()

    def _mark_ready(self) -> None:
        if self._subscribed_once.is_set() and (self.receiver is None or self.receiver.ready.is_set()):
            self.ready.set()

    def handle(self, topic: str, payload: bytes, *, retained: bool = False) -> Effects:
        """Process one MQTT message (synchronous and cheap; heavy work is handed to executors)."""
        return self._dispatch(self.core.ingest(topic, payload, retained=retained))

    def _dispatch(self, fx: Effects) -> Effects:
        """Hand what the core asked for to the collaborators: serving, training thread, downlinks, outbox."""
        self.receipts.touched(fx.receipt)
        for request in fx.infers:
            self.serving.submit(request)
        for job in fx.applies:
            self._spawn(self._apply(job))
        self.downlinks.emit(fx.out)
        for seq, reason in fx.verdicts:
            self.outbox.settle(seq, reason)
        if fx.train_due:
            self._train_wake.set()
        return fx

    # ================================================================= reporting
    def metrics(self) -> dict[str, Any]:
        """Everything the dashboard and the closed-loop progress table read (JSON-safe)."""
        live = {"outbox": len(self.outbox), "infer_queue": self.serving.queue.qsize(),
                "downlink_queue": self.downlinks.qsize(), "infer_latency_ms": self.serving.latency_ms,
                "connected": self.connected.is_set(), "serving": self.onnx.metrics()}
        return edge_metrics(self.core, self._ingest_rate, self.last_round, live)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


__all__ = ["EdgeAgent"]
