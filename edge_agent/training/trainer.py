"""Local training of the edge model on its replay buffer.

Synchronous by design: the service runs ``train_round`` in an executor thread.
A lock is taken per optimisation step (not per round), so ``predict`` from the
event-loop thread waits at most one step, never a whole round.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from peft import PeftModel

from edge_agent.training import optimizer_state
from edge_agent.training.adaptive_mix import best_mix, mix
from edge_agent.training.checkpoint import read_checkpoint, write_checkpoint
from edge_agent.training.replay import BufferedSample, ReplayBuffer
from megace_model.adapters import (
    build_edge_model,
    load_personal,
    load_shared,
    personal_state,
    shared_state,
)
from megace_model.batch import Batch, collate, validate_sample
from megace_model.config import EdgeModelConfig
from megace_model.contrastive import contrastive_loss
from megace_model.errors import AdapterMismatchError, CheckpointError, InsufficientDataError
from megace_model.fingerprint import base_fingerprint

Sample = Mapping[str, Any]


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Trainer:
    """Owns the LoRA-wrapped model, its AdamW optimizer and the replay buffer.

    Held-out data: every ``holdout_every``-th buffered sample (by arrival order)
    is never trained on; held-out accuracy is measured on the most recent
    ``holdout_window`` of them, i.e. on fresh data from the current distribution.

    ``defer_global``: the cloud's adapter becomes the start of the next local round instead of
    replacing the served one, so the model served between rounds is always the one fine-tuned on
    this site (local adaptation after aggregation). Why: installing the global right after a round
    serves an adapter the personal part was not trained with; a newcomer then answers with the fleet's
    adapter on its one-round-old personal part (reports/experiment-fleet.md: +8 to +14 points for a
    late edge after its first round, about +1 for the others). A deferred global is not checkpointed:
    after a restart the next round starts from the site's own adapter.

    ``mix_grid`` (with ``defer_global``): the next round starts from the mix of the fleet's model and the
    site's own that does best on the held-out samples (:mod:`edge_agent.training.adaptive_mix`).
    """

    def __init__(
        self,
        config: EdgeModelConfig,
        *,
        buffer: ReplayBuffer | None = None,
        lr: float = 2e-3,
        weight_decay: float = 0.01,
        holdout_every: int = 5,
        holdout_window: int = 256,
        max_grad_norm: float = 1.0,
        reset_shared_optimizer_state: bool = True,
        device: torch.device | str | None = None,
        defer_global: bool = False,
        mix_grid: tuple[float, ...] = (),
    ) -> None:
        if holdout_every < 2:
            raise ValueError("holdout_every must be >= 2")
        if any(not 0.0 <= w <= 1.0 for w in mix_grid):
            raise ValueError(f"mix_grid weights must be in [0, 1], got {mix_grid}")
        if mix_grid and not defer_global:
            raise ValueError("mix_grid needs defer_global (the fleet's model is mixed in when a round starts)")
        self.config = config
        self.fingerprint = base_fingerprint(config)
        self.device = torch.device(device) if device is not None else default_device()
        self.model: PeftModel = build_edge_model(config).to(self.device)
        self.buffer = buffer if buffer is not None else ReplayBuffer()
        self.holdout_every = holdout_every
        self.holdout_window = holdout_window
        self.max_grad_norm = max_grad_norm
        self.reset_shared_optimizer_state = reset_shared_optimizer_state
        self.defer_global = defer_global
        self._pending_global: dict[str, torch.Tensor] | None = None  # defer_global: the next round's start
        self._pending_personal: dict[str, torch.Tensor] | None = None  # ... and its personal part (share_personal)
        self.mix_grid = tuple(mix_grid)
        self._param_names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self._params, lr=lr, weight_decay=weight_decay)
        self.rounds = 0
        self.steps = 0
        self._lock = threading.RLock()
        self._rng = np.random.default_rng(config.seed)

    # ------------------------------------------------------------------ data
    def add_sample(self, sample: Sample, device_id: str = "local") -> BufferedSample:
        """Validate (``SampleError`` on bad input) and buffer a labelled sample."""
        validate_sample(sample, self.config, need_label=True)
        return self.buffer.add(device_id, sample["modalities"], int(sample["label"]))

    def split(self) -> tuple[list[BufferedSample], list[BufferedSample]]:
        """(train, held-out) views of the buffer; held-out limited to the most recent window."""
        items = self.buffer.snapshot()
        train = [s for s in items if s.seq % self.holdout_every]
        held = [s for s in items if not s.seq % self.holdout_every]
        return train, held[-self.holdout_window :]

    # -------------------------------------------------------------- training
    def _batches(self, n: int, batch_size: int, steps: int | None, epochs: int | None) -> Iterator[np.ndarray]:
        if steps is None:
            for _ in range(epochs if epochs is not None else 1):
                order = self._rng.permutation(n)
                for start in range(0, n, batch_size):
                    yield order[start : start + batch_size]
            return
        order = self._rng.permutation(n)
        pos = 0
        for _ in range(steps):
            if pos + batch_size > n and pos > 0:
                order, pos = self._rng.permutation(n), 0
            yield order[pos : pos + batch_size]
            pos += batch_size

    def _loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.model(**batch.model_inputs())
        ce = F.cross_entropy(out.logits, batch.labels)
        if self.config.contrastive_weight > 0:
            con = contrastive_loss(
                out.pooled, out.presence, self.config.modality_names, self.config.contrastive_temperature
            )
        else:
            con = ce.new_zeros(())
        return ce + self.config.contrastive_weight * con, ce, con, out.logits

    def train_round(
        self, *, steps: int | None = None, epochs: int | None = None, batch_size: int = 32
    ) -> dict[str, Any]:
        """Train on the buffer for ``steps`` optimizer steps or ``epochs`` passes (default 1 epoch).

        Returns loss, ce_loss, contrastive_loss, train_acc (running, during the round),
        heldout_acc (after the round; None without held-out data), sample counts,
        steps, skipped_steps (non-finite loss), duration_s and mix_weight (the fleet's weight in the
        round's start under ``mix_grid``, else None).
        """
        if steps is not None and epochs is not None:
            raise ValueError("give steps or epochs, not both")
        started = time.perf_counter()
        train, held = self.split()
        if not train:
            raise InsufficientDataError("no trainable samples in the replay buffer")
        mix_weight = self._install_pending_global()
        sums = {"loss": 0.0, "ce": 0.0, "con": 0.0}
        correct = seen = done = skipped = 0
        for idx in self._batches(len(train), batch_size, steps, epochs):
            batch = collate([train[i].as_sample() for i in idx], self.config).to(self.device)
            with self._lock:
                self.model.train()
                loss, ce, con, logits = self._loss(batch)
                if not torch.isfinite(loss):
                    skipped += 1
                    self.optimizer.zero_grad(set_to_none=True)
                    continue
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self._params, self.max_grad_norm)
                self.optimizer.step()
                self.steps += 1
            done += 1
            sums["loss"] += float(loss.detach())
            sums["ce"] += float(ce.detach())
            sums["con"] += float(con.detach())
            correct += int((logits.argmax(-1) == batch.labels).sum())
            seen += len(idx)
        self.rounds += 1
        held_acc = self.evaluate([s.as_sample() for s in held])["acc"] if held else None
        denom = max(done, 1)
        return {
            "round": self.rounds,
            "loss": sums["loss"] / denom if done else math.nan,
            "ce_loss": sums["ce"] / denom if done else math.nan,
            "contrastive_loss": sums["con"] / denom if done else math.nan,
            "train_acc": correct / seen if seen else math.nan,
            "heldout_acc": held_acc,
            "n_train": len(train),
            "n_heldout": len(held),
            "steps": done,
            "skipped_steps": skipped,
            "duration_s": time.perf_counter() - started,
            "mix_weight": mix_weight,
        }

    # ------------------------------------------------------------- inference
    def evaluate(self, samples: Sequence[Sample], batch_size: int = 128) -> dict[str, Any]:
        """Accuracy and mean cross-entropy on labelled samples (eval mode, no grad)."""
        correct = 0
        loss_sum = 0.0
        for start in range(0, len(samples), batch_size):
            batch = collate(samples[start : start + batch_size], self.config).to(self.device)
            with self._lock, torch.no_grad():
                self.model.eval()
                logits = self.model(**batch.model_inputs()).logits
            loss_sum += float(F.cross_entropy(logits, batch.labels, reduction="sum"))
            correct += int((logits.argmax(-1) == batch.labels).sum())
        n = len(samples)
        return {"acc": correct / n if n else math.nan, "loss": loss_sum / n if n else math.nan, "n": n}

    def predict(self, sample: Sample) -> tuple[int, np.ndarray]:
        """Class index and class probabilities (float32) for one sample; the label is ignored."""
        batch = collate([sample], self.config, with_labels=False).to(self.device)
        with self._lock, torch.no_grad():
            self.model.eval()
            probs = torch.softmax(self.model(**batch.model_inputs()).logits[0].float(), dim=-1)
        out = probs.cpu().numpy()
        return int(out.argmax()), out

    # --------------------------------------------------------------- adapters
    def shared_state(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The upload: shared LoRA tensors (optionally float16)."""
        with self._lock:
            return shared_state(self.model, dtype)

    def personal_state(self) -> dict[str, torch.Tensor]:
        with self._lock:
            return personal_state(self.model)

    def apply_global(self, tensors: Mapping[str, torch.Tensor | np.ndarray], *, strict: bool = True,
                     personal: Mapping[str, torch.Tensor] | None = None) -> None:
        """Install the cloud's global shared adapter (validated; typed error leaves the model as is).

        ``strict=False`` accepts a subset: a site's view leaves out modules of modalities the edge
        never saw (modality-aware) or the B matrices it keeps (fedsa); those keep their values.
        Adam moments of shared tensors are reset by default: they describe the
        local trajectory before aggregation and point the wrong way afterwards.
        ``personal``: the fleet's personal part (``share_personal``), all of it; installed, or deferred, with
        the adapter.
        """
        with self._lock:
            own = personal_state(self.model) if personal is not None else None
            served = shared_state(self.model) if self.defer_global else None
            if personal is not None:
                load_personal(self.model, personal)  # validates before it writes
            try:
                load_shared(self.model, tensors, strict=strict)
            except Exception:
                if own is not None:
                    load_personal(self.model, own)
                raise
            if served is None:
                self._reset_lora_moments()
                return
            # validated and captured now (the served model is put back), installed when the next round starts
            self._pending_global = shared_state(self.model)
            self._pending_personal = personal_state(self.model) if own is not None else None
            load_shared(self.model, served, strict=True)
            if own is not None:
                load_personal(self.model, own)

    @property
    def pending_global(self) -> bool:
        """A deferred global waits for the next round (``defer_global``)."""
        return self._pending_global is not None

    @property
    def pending_personal(self) -> dict[str, torch.Tensor] | None:
        """The fleet's personal part deferred with the global (``share_personal``), or None."""
        with self._lock:
            return None if self._pending_personal is None else dict(self._pending_personal)

    def _install_pending_global(self) -> float | None:
        """Install a deferred global (and its personal part); the fleet's weight when ``mix_grid`` chose one."""
        with self._lock:
            shared, personal = self._pending_global, self._pending_personal
            self._pending_global = self._pending_personal = None
            if shared is None:
                return None
            if self.mix_grid:
                return self._start_from_mix(shared, personal)
            self._install(shared, strict=True)
            if personal is not None:
                load_personal(self.model, personal)
            return None

    def _start_from_mix(self, shared: Mapping[str, torch.Tensor], personal: Mapping[str, torch.Tensor] | None) -> float:
        """Start the round from the fleet/own mix that does best on the held-out samples (``mix_grid``)."""
        own_lora, own_body = shared_state(self.model), personal_state(self.model)
        held = [s.as_sample() for s in self.split()[1]]

        def install(w: float) -> None:
            self._install(mix(shared, own_lora, w), strict=True)
            if personal is not None:
                load_personal(self.model, mix(personal, own_body, w))

        return best_mix(self.mix_grid, install, lambda: self.evaluate(held)["acc"] if held else 0.0)

    def _install(self, tensors: Mapping[str, torch.Tensor | np.ndarray], *, strict: bool) -> None:
        with self._lock:
            load_shared(self.model, tensors, strict=strict)
            self._reset_lora_moments()

    def _reset_lora_moments(self) -> None:
        if self.reset_shared_optimizer_state:
            for name, param in zip(self._param_names, self._params, strict=True):
                if ".lora_" in name:
                    self.optimizer.state.pop(param, None)

    # ----------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Trainable params (shared + personal), optimizer state and counters; tensors on CPU."""
        with self._lock:
            return {
                "shared": shared_state(self.model),
                "personal": personal_state(self.model),
                "optimizer": self.optimizer.state_dict(),
                "meta": {
                    "base_fingerprint": self.fingerprint,
                    "config": self.config.to_dict(),
                    "param_names": list(self._param_names),
                    "rounds": self.rounds,
                    "steps": self.steps,
                },
            }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from ``state_dict()``; all-or-nothing (rolls back on any error)."""
        meta = state["meta"]
        if meta.get("base_fingerprint") != self.fingerprint:
            raise CheckpointError("checkpoint was made for a different frozen base")
        if meta.get("param_names") != self._param_names:
            raise CheckpointError("checkpoint trainable parameters differ from this model's")
        with self._lock:
            backup = self.state_dict()
            try:
                load_shared(self.model, state["shared"], strict=True)
                load_personal(self.model, state["personal"])
                self.optimizer.load_state_dict(state["optimizer"])
            except (AdapterMismatchError, ValueError, KeyError, RuntimeError) as exc:
                load_shared(self.model, backup["shared"], strict=True)
                load_personal(self.model, backup["personal"])
                self.optimizer.load_state_dict(backup["optimizer"])
                raise CheckpointError(f"checkpoint does not fit this model: {exc}") from exc
            self.rounds = int(meta.get("rounds", 0))
            self.steps = int(meta.get("steps", 0))

    def save_checkpoint(self, path: str | Path) -> Path:
        """Write ``checkpoint.safetensors`` + ``checkpoint.json`` into directory ``path``."""
        state = self.state_dict()
        opt_tensors, opt_meta = optimizer_state.flatten(state["optimizer"])
        tensors = {f"shared/{k}": v for k, v in state["shared"].items()}
        tensors.update({f"personal/{k}": v for k, v in state["personal"].items()})
        tensors.update(opt_tensors)
        return write_checkpoint(path, tensors, {**state["meta"], "optimizer": opt_meta})

    def load_checkpoint(self, path: str | Path) -> None:
        """Load a checkpoint directory; ``CheckpointError`` if missing, corrupt or foreign."""
        tensors, meta = read_checkpoint(path)
        try:
            state = {
                "shared": {k[7:]: v for k, v in tensors.items() if k.startswith("shared/")},
                "personal": {k[9:]: v for k, v in tensors.items() if k.startswith("personal/")},
                "optimizer": optimizer_state.unflatten(tensors, meta["optimizer"]),
                "meta": meta,
            }
        except (KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"malformed checkpoint metadata: {exc}") from exc
        self.load_state_dict(state)


__all__ = ["Trainer", "default_device"]
