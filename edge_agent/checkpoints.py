"""Checkpoints and the peft export: restore the newest usable generation, save one, export the shared adapter.

Synchronous and network-free; the service runs these on its training thread, where the trainer is written.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from broker.metrics import Counters
from edge_agent.config import EdgeConfig
from edge_agent.core import EdgeCore
from edge_agent.state import AgentState, StateError, StateStore
from edge_agent.training.adaptive_mix import MIX_GRID
from edge_agent.training.replay import BufferedSample, ReplayBuffer
from edge_agent.training.trainer import Trainer
from megace_model.errors import CheckpointError
from megace_model.export import export_shared

log = logging.getLogger(__name__)


def restore(
    store: StateStore, core: EdgeCore, counters: Counters, outbox: list[tuple[int, bytes]]
) -> dict[str, Any]:
    """Load the newest verifiable generation into ``core`` (corrupt ones are logged, counted and skipped);
    pending unconfirmed uploads are appended to ``outbox`` (in seq order). Returns the last round's
    metrics ({} if none)."""
    trainer = core.trainer
    assert trainer is not None
    edge_id = core.edge_id
    last_round: dict[str, Any] = {}
    confirmed = store.confirmed()
    corrupt = False
    for gen_dir in store.candidates():
        try:
            gen = store.read(gen_dir)
            trainer.load_checkpoint(gen.trainer_dir)
        except (StateError, CheckpointError) as exc:
            log.error("edge %s: checkpoint %s unusable (%s); trying an older one", edge_id, gen_dir, exc)
            counters.inc("checkpoint_corrupt")
            counters.reject(exc)
            corrupt = True
            continue
        trainer.buffer.restore(gen.samples)
        core.registry.load_dict(gen.registry)
        core.state = gen.state
        for name, value in gen.state.totals.items():
            counters.inc(name, int(value))
        last_round = dict(gen.state.last_round)
        outbox.extend((seq, payload) for seq, payload in gen.outbox if seq > confirmed)
        log.info("edge %s: resumed from %s (round %d, upload seq %d, %d samples, %d pending uploads)",
                 edge_id, gen_dir.name, core.state.round, core.state.upload_seq, len(gen.samples), len(outbox))
        break
    else:
        if store.has_state():
            log.error("edge %s: no usable checkpoint under %s; starting fresh", edge_id, store.root)
            corrupt = True
    state = core.state
    state.upload_seq = max(state.upload_seq, confirmed)
    if corrupt:
        # Seqs after the last readable generation may have been published with other content:
        # jump past anything this edge could have used (the cloud counts it as a gap, not a replay).
        state.upload_seq = max(state.upload_seq, time.time_ns() // 1_000_000)
    return last_round


def save(store: StateStore, trainer: Trainer, snap: Snapshot, *, export: bool) -> None:
    """Persist one generation (and, with ``export``, replace the peft export under ``state_dir/adapter``)."""
    store.save(trainer=trainer, state=snap.state, registry=snap.registry, samples=snap.samples, outbox=snap.outbox)
    if export:
        export_adapter(store, trainer)


def export_adapter(store: StateStore, trainer: Trainer) -> None:
    """Write the shared adapter in peft layout next to the state, swapping directories so readers never
    see a half-written one."""
    target = store.root / "adapter"
    fresh, old = target.with_name("adapter.new"), target.with_name("adapter.old")
    shutil.rmtree(fresh, ignore_errors=True)
    export_shared(trainer.model, fresh)
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(fresh, target)
    shutil.rmtree(old, ignore_errors=True)


def build_trainer(config: EdgeConfig) -> Trainer:
    """The trainer with its bounded replay buffer (slow: model construction); before :func:`restore`."""
    t, lim = config.training, config.limits
    if t.torch_threads:
        torch.set_num_threads(t.torch_threads)
    buffer = ReplayBuffer(max_total=lim.replay_max_total, max_per_device=lim.replay_max_per_device,
                          max_per_modality=lim.replay_max_per_modality, max_bytes=lim.replay_max_bytes,
                          max_bytes_per_device=lim.replay_max_bytes_per_device)
    device = None if t.device == "auto" else t.device
    return Trainer(config.model, buffer=buffer, lr=t.lr, weight_decay=t.weight_decay,
                   holdout_every=t.holdout_every, device=device, defer_global=t.defer_global,
                   mix_grid=MIX_GRID if t.adaptive_mix else ())


@dataclass(frozen=True)
class Snapshot:
    """What one generation holds, all copied at the same moment on the loop."""

    state: AgentState
    registry: dict[str, Any]
    samples: list[BufferedSample]
    outbox: list[tuple[int, bytes]]


def snapshot(core: EdgeCore, last_round: dict[str, Any], outbox: list[tuple[int, bytes]]) -> Snapshot:
    """Copy the core's state, registry and replay buffer (counter totals and the last round go into the state).

    Taken on the loop, between two messages: the samples match the registry's sequence guards and
    the ingest log's segment boundary exactly (the model weights are saved later, on the training
    thread, and are only as fresh as the last round anyway)."""
    state = core.state
    state.totals = {k: int(v) for k, v in core.counters.snapshot().items() if isinstance(v, int)}
    state.last_round = dict(last_round)
    assert core.trainer is not None
    return Snapshot(AgentState(**asdict(state)), core.registry.to_dict(), core.trainer.buffer.snapshot(), outbox)


_heap_frozen = False


def freeze_startup_heap() -> None:
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
