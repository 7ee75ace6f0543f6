"""Uploads: the adapter-update envelope a round produces, and the bounded outbox it waits in.

An upload's bytes are built once (on the training thread), persisted with the checkpoint and sent
as they are, from the :class:`edge_agent.outbox.Outbox`, until the cloud says what became of it.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from broker.signing import Signer
from broker.wire import AdapterUpdate, Kind, encode_envelope
from edge_agent.config import EdgeConfig
from edge_agent.training.trainer import Trainer
from megace_common.lora import add_peft_prefix

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
