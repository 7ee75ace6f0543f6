"""What the edge reports: the metrics snapshot (dashboard, closed-loop progress table) and its status."""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Callable
from typing import Any

import aiomqtt

from broker import topics
from broker.aio import publish_one, wait_event
from broker.metrics import Counters
from broker.wire import Status
from broker.wire.status import OFFLINE, event_payload, metrics_payload
from edge_agent.config import EdgeConfig
from edge_agent.core import EdgeCore
from edge_agent.state import AgentState


class IngestRate:
    """Labelled samples per second, re-estimated at most every half second."""

    def __init__(self) -> None:
        self._mark = (time.monotonic(), 0)
        self.value = 0.0

    def update(self, total: int) -> float:
        now = time.monotonic()
        mark_t, mark_n = self._mark
        if now - mark_t >= 0.5:
            self.value = (total - mark_n) / (now - mark_t)
            self._mark = (now, total)
        return self.value


def edge_metrics(core: EdgeCore, rate: IngestRate, last_round: dict[str, Any], live: dict[str, Any]) -> dict[str, Any]:
    """Counters plus state, last round and ``live`` (the service's queue depths, latency, connection): JSON-safe."""
    snap = core.counters.snapshot()
    total = int(snap.get("samples_total", 0))
    ingest_rate = rate.update(total)
    trainer, state, config = core.trainer, core.state, core.config
    buffer = trainer.buffer if trainer is not None else None

    def num(key: str) -> float | None:
        value = last_round.get(key)
        return None if value is None or not math.isfinite(float(value)) else float(value)

    rejected = {k.split(".", 1)[1]: v for k, v in snap.items() if k.startswith("rejected.")}
    return {
        **snap,
        "edge": core.edge_id,
        "site": core.site,
        "round": state.round,
        "global_version": state.global_version,
        "global_source": state.global_source,
        "upload_seq": state.upload_seq,
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
        "ingest_rate": round(ingest_rate, 2),
        "rank": config.model.lora_r,
        "modalities": dict(core.modalities_seen),
        "devices": len(core.registry),
        "buffer": len(buffer) if buffer is not None else 0,
        "buffer_dropped": buffer.dropped.get("all", 0) if buffer is not None else 0,
        "outbox": live["outbox"],
        "infer_queue": live["infer_queue"],
        "downlink_queue": live["downlink_queue"],
        "infer_latency_ms": round(live["infer_latency_ms"], 3),
        "connected": live["connected"],
        "local_only": config.training.local_only,
        "share_personal": config.training.share_personal,
        **live.get("serving", {}),  # inference backend (torch/onnx), model version, ONNX parity and timings
    }


def status_payload(config: EdgeConfig, state: str) -> bytes:
    """The retained online/offline status (with what a dashboard shows about this edge)."""
    model = config.model
    detail = {"site": config.site, "rank": model.lora_r, "backbone": model.backbone,
              "modalities": list(model.modality_names), "pid": os.getpid()}
    return Status(role=topics.Role.EDGE.value, id=config.edge_id, state=state, detail=detail).encode()


def _finite(value: Any) -> float | None:
    """JSON has no NaN: a round with no step (or no held-out data) reports null."""
    return None if value is None or not math.isfinite(float(value)) else float(value)


def round_event(config: EdgeConfig, state: AgentState, metrics: dict[str, Any], payload: bytes | None,
                counters: Counters) -> bytes:
    """The per-round JSON event (docs/METRICS.md, ``round``): what a dashboard charts per edge."""
    data = {
        "round": int(state.round),
        "global_version": int(state.global_version),
        "loss": _finite(metrics.get("loss")),
        "train_acc": _finite(metrics.get("train_acc")),
        "heldout_acc": _finite(metrics.get("heldout_acc")),
        "samples": int(metrics.get("n_train", 0)),
        "heldout_samples": int(metrics.get("n_heldout", 0)),
        "duration_s": _finite(metrics.get("duration_s")),
        "mix_weight": _finite(metrics.get("mix_weight")),
        "upload_bytes": len(payload) if payload is not None else 0,
        "bytes_up": int(counters["bytes_up"]),
        "bytes_down": int(counters["bytes_down"]),
    }
    return event_payload(topics.Role.EDGE.value, config.edge_id, "round", data, site=config.site)


class Reporter:
    """What the edge tells dashboards on its site's topics: retained status, metrics and per-round events.

    The service sets :attr:`wake` when something worth showing changed (a round, an applied global, an
    upload sent); :meth:`run` publishes then, or every ``metrics_interval_s`` otherwise.
    """

    def __init__(self, config: EdgeConfig, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.config = config
        self.snapshot = snapshot
        self.wake = asyncio.Event()
        self.status_topic = topics.status(topics.Role.EDGE, config.edge_id, config.site)
        self.metrics_topic = topics.metrics(topics.Role.EDGE, config.edge_id, config.site)
        self.event_topic = topics.events(topics.Role.EDGE, config.edge_id, config.site)
        self.pending_event: bytes | None = None
        """The last round's JSON event, until it is published."""

    def status(self, state: str) -> bytes:
        return status_payload(self.config, state)

    def will(self) -> aiomqtt.Will:
        return aiomqtt.Will(self.status_topic, self.status(OFFLINE), qos=1, retain=True)

    def round_done(self, state: AgentState, metrics: dict[str, Any], payload: bytes | None,
                   counters: Counters) -> None:
        self.pending_event = round_event(self.config, state, metrics, payload, counters)
        self.wake.set()

    async def publish(self, client: aiomqtt.Client) -> None:
        """The current metrics (retained) and the round event not yet sent."""
        await publish_one(client, self.metrics_topic, metrics_payload(
            topics.Role.EDGE.value, self.config.edge_id, self.snapshot(), site=self.config.site), qos=0, retain=True)
        event, self.pending_event = self.pending_event, None
        if event is not None:  # retained: a dashboard opened later still sees the last round
            await publish_one(client, self.event_topic, event, qos=1, retain=True)

    async def run(self, client: aiomqtt.Client) -> None:
        """Per connection: publish on :attr:`wake` or every ``metrics_interval_s``, until cancelled."""
        while True:
            await wait_event(self.wake, self.config.metrics_interval_s)
            self.wake.clear()
            await self.publish(client)
