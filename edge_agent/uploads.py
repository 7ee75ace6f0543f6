"""Uploads: the adapter-update envelope a round produces, and the bounded outbox it waits in.

An upload's bytes are built once (on the training thread), persisted with the checkpoint and sent
as they are; it leaves the :class:`Outbox` only once the broker acknowledged it, and its seq is then
confirmed in the state store.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import aiomqtt
import torch

from broker.aio import publish
from broker.metrics import Counters
from broker.signing import Signer
from broker.wire import AdapterUpdate, Kind, encode_envelope
from edge_agent.config import EdgeConfig
from edge_agent.state import StateStore
from edge_agent.training.trainer import Trainer
from megace_common.lora import add_peft_prefix

log = logging.getLogger(__name__)

METRIC_KEYS = ("loss", "ce_loss", "contrastive_loss", "train_acc", "heldout_acc", "n_train", "n_heldout", "steps",
               "duration_s")


def upload_payload(
    config: EdgeConfig, trainer: Trainer, metrics: dict[str, Any], shared: dict[str, torch.Tensor],
    personal: dict[str, torch.Tensor], *, seq: int, global_version: int, signer: Signer | None = None,
) -> bytes:
    """The encoded ``adapter`` envelope for one round (fp16 if configured; personal tensors if shared),
    signed with the edge's key when it has one (the cloud binds the key to this edge and site)."""
    t = config.training
    dtype = torch.float16 if t.upload_fp16 else torch.float32
    tensors = {k: v.to(dtype).numpy() for k, v in shared.items()}
    if t.share_personal:
        tensors.update({add_peft_prefix(k): v.to(dtype).numpy() for k, v in personal.items()})
    numbers = {k: float(metrics[k]) for k in METRIC_KEYS
               if metrics.get(k) is not None and math.isfinite(float(metrics[k]))}
    update = AdapterUpdate(
        edge=config.edge_id, site=config.site, seq=seq, base_version=max(global_version, 0),
        base_model=trainer.fingerprint, rank=config.model.lora_r, alpha=float(config.model.lora_alpha),
        samples=int(metrics["n_train"]), modalities=dict(trainer.buffer.counts()["modalities"]),
        tensors=tensors, metrics=numbers,
    )
    payload = encode_envelope(Kind.ADAPTER, config.edge_id, seq, update.to_body())
    return payload if signer is None else signer.sign(payload)


class Outbox:
    """Uploads that are checkpointed and not yet confirmed, oldest first, and the loop that sends them.

    An upload enters only after the checkpoint that holds it committed, so a crash before it is
    confirmed re-sends the same seq with the same bytes. Bounded: past ``limit`` the oldest are
    dropped (counted as ``uploads_dropped``), since a newer adapter supersedes an older one.

    Args:
        counters: Where ``uploads``, ``uploads_dropped`` and ``bytes_up`` are counted.
        store: The state store whose ``confirm(seq)`` records that an upload left for good.
        edge_id: The sender id stamped on chunk frames.
        topic: The cloud upload topic of this edge's site.
        limit: Uploads that may wait at once.
        max_packet: The largest MQTT packet to send; bigger uploads go as chunks.
        on_sent: Called after each confirmed upload (the service wakes its metrics publisher).
    """

    def __init__(self, counters: Counters, store: StateStore, *, edge_id: str, topic: str, limit: int,
                 max_packet: int, on_sent: Callable[[], None] = lambda: None) -> None:
        self.counters = counters
        self.store = store
        self.edge_id = edge_id
        self.topic = topic
        self.limit = limit
        self.max_packet = max_packet
        self.on_sent = on_sent
        self._items: deque[tuple[int, bytes]] = deque()
        self._wake = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        return iter(list(self._items))

    def extend(self, uploads: Iterable[tuple[int, bytes]]) -> None:
        """Add checkpointed uploads in seq order and wake the sender; the oldest past ``limit`` are dropped."""
        self._items.extend(uploads)
        while len(self._items) > self.limit:
            self._items.popleft()
            self.counters.inc("uploads_dropped")
        self._wake.set()

    async def send(self, client: aiomqtt.Client) -> None:
        """Publish in seq order until cancelled; an upload leaves only once the broker acknowledged it."""
        while True:
            self._wake.clear()
            while self._items:
                seq, payload = self._items[0]
                sent = await publish(client, self.topic, payload, sender=self.edge_id, seq=seq, qos=1,
                                     max_packet=self.max_packet)
                if self._items and self._items[0][0] == seq:
                    self._items.popleft()
                self.store.confirm(seq)
                self.counters.inc("uploads")
                self.counters.inc("bytes_up", sent)
                log.info("edge %s uploaded adapter seq %d (%d bytes)", self.edge_id, seq, sent)
                self.on_sent()
            await self._wake.wait()


def train_round(
    config: EdgeConfig, trainer: Trainer, seq: int | None, global_version: int, signer: Signer | None = None
) -> tuple[dict[str, Any], bytes | None, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Training thread: one local round, then (with a ``seq``) its upload envelope — the bytes that get
    persisted with the checkpoint and sent as they are."""
    t = config.training
    metrics = trainer.train_round(steps=t.steps, epochs=t.epochs, batch_size=t.batch_size)
    shared, personal = trainer.shared_state(), trainer.personal_state()
    payload = None
    if seq is not None:
        payload = upload_payload(config, trainer, metrics, shared, personal, seq=seq, global_version=global_version,
                                 signer=signer)
    return metrics, payload, shared, personal
