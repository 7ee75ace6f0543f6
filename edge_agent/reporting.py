"""What the edge reports: the metrics snapshot (dashboard, closed-loop progress table) and its status."""

from __future__ import annotations

import math
import os
import time
from typing import Any

from broker import topics
from broker.wire import Status
from edge_agent.config import EdgeConfig
from edge_agent.core import EdgeCore


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
    }


def status_payload(config: EdgeConfig, state: str) -> bytes:
    """The retained online/offline status (with what a dashboard shows about this edge)."""
    model = config.model
    detail = {"site": config.site, "rank": model.lora_r, "backbone": model.backbone,
              "modalities": list(model.modality_names), "pid": os.getpid()}
    return Status(role=topics.Role.EDGE.value, id=config.edge_id, state=state, detail=detail).encode()
