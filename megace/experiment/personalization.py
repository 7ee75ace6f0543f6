"""Personalization variants tried by the fleet benchmark (an experiment-side Trainer).

Why here and not in ``edge_agent.training``: none of the head variants beat megace as committed in the paired
comparison (reports/experiment-fleet.md), so they stay reproducible here and out of the product; the one kept,
``defer_global``, is the product Trainer's own setting.

By default the personal part (embeddings, cross-modal block, head) never leaves the edge, so it learns
only from the edge's own samples; with scarce data that is where the fleet cannot help. A
:class:`Personalization` names personal modules that travel with the adapter (``fleet_modules``, e.g. the
head: 1.3 k numbers with the tiny backbone, a few percent of the upload) and says what an edge does with
the fleet's aggregate of them: start from it (``mix=1``, FedBABU/FedRep-style), blend it with its own
(``0 < mix < 1``) or keep its own and be pulled towards it while training (``prox``, Ditto-style).
``frozen`` keeps personal modules at their seeded initial value, identical on every edge, so that what
the fleet aggregates sits on the same features everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from peft import PeftModel

from edge_agent.training.trainer import Trainer
from megace_model.batch import Batch
from megace_model.classifier import PERSONAL_MODULES
from megace_model.errors import AdapterMismatchError, NonFiniteAdapterError


@dataclass(frozen=True)
class Personalization:
    """The personal part's fleet settings; the default is the historical behaviour (fully private)."""

    fleet_modules: tuple[str, ...] = ()
    mix: float = 1.0
    prox: float = 0.0
    frozen: tuple[str, ...] = ()
    defer_global: bool = False
    """The product's ``Trainer(defer_global=True)``: the one variant kept (it helps a late edge, costs nobody)."""
    mix_grid: tuple[float, ...] = ()
    """The product's ``Trainer(mix_grid=...)`` (``[training] adaptive_mix``, checked there): with ``defer_global``
    a round starts from the fleet/own mix that scores best on the site's held-out samples."""

    def __post_init__(self) -> None:
        for name in (*self.fleet_modules, *self.frozen):
            if name not in PERSONAL_MODULES:
                raise ValueError(f"{name!r} is not a personal module; personal modules: {PERSONAL_MODULES}")
        if set(self.fleet_modules) & set(self.frozen):
            raise ValueError("a frozen module cannot also be trained with the fleet")
        if not 0.0 <= self.mix <= 1.0:
            raise ValueError(f"mix must be in [0, 1], got {self.mix}")
        if self.prox < 0:
            raise ValueError(f"prox must be >= 0, got {self.prox}")

    @property
    def active(self) -> bool:
        return bool(self.fleet_modules)


def _top(name: str) -> str:
    return name.split(".", 1)[0]


def freeze(model: PeftModel, p: Personalization) -> None:
    """Stop training the ``frozen`` personal modules (they keep the seeded init every edge shares)."""
    for name, param in model.get_base_model().named_parameters():
        if _top(name) in p.frozen:
            param.requires_grad_(False)


def fleet_params(model: PeftModel, p: Personalization) -> dict[str, torch.nn.Parameter]:
    """The personal parameters that travel with the adapter, by base-model name (``head.1.weight``)."""
    return {n: q for n, q in model.get_base_model().named_parameters() if _top(n) in p.fleet_modules}


def fleet_state(model: PeftModel, p: Personalization) -> dict[str, torch.Tensor]:
    """Detached CPU copies of the fleet modules: what is uploaded besides the LoRA tensors."""
    return {n: q.detach().to("cpu").clone() for n, q in fleet_params(model, p).items()}


def check_fleet(model: PeftModel, p: Personalization, tensors: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """Validate an aggregate of the fleet modules (exact names, shapes, finite) before anything is written."""
    own = fleet_params(model, p)
    if set(tensors) != set(own):
        raise AdapterMismatchError(f"fleet tensors differ from this edge's: {sorted(set(tensors) ^ set(own))[:5]}")
    out: dict[str, torch.Tensor] = {}
    for name, value in tensors.items():
        t = torch.as_tensor(np.asarray(value, dtype=np.float32))
        if tuple(t.shape) != tuple(own[name].shape):
            raise AdapterMismatchError(f"{name}: shape {tuple(t.shape)} != {tuple(own[name].shape)}")
        if not torch.isfinite(t).all():
            raise NonFiniteAdapterError(f"{name}: contains NaN or infinite values")
        out[name] = t
    return out


def blend(model: PeftModel, p: Personalization, tensors: Mapping[str, torch.Tensor]) -> None:
    """``θ := mix · θ_fleet + (1 - mix) · θ_own`` for every fleet module (``tensors`` already checked)."""
    own = fleet_params(model, p)
    with torch.no_grad():
        for name, value in tensors.items():
            param = own[name]
            param.mul_(1.0 - p.mix).add_(value.to(param.device, param.dtype), alpha=p.mix)


def proximal(model: PeftModel, p: Personalization, anchor: Mapping[str, torch.Tensor] | None) -> torch.Tensor | None:
    """Ditto's ``prox / 2 · Σ ||θ - θ_fleet||²`` over the fleet modules; None when off or before any aggregate."""
    if p.prox <= 0 or not anchor:
        return None
    own = fleet_params(model, p)
    total = sum(((own[n] - a.to(own[n].device)) ** 2).sum() for n, a in anchor.items())
    return 0.5 * p.prox * total  # type: ignore[return-value]


class FleetTrainer(Trainer):
    """The edge's :class:`Trainer` plus a :class:`Personalization` (what the variants' arms run)."""

    def __init__(self, *args: Any, personalization: Personalization | None = None, **kwargs: Any) -> None:
        p = personalization if personalization is not None else Personalization()
        super().__init__(*args, defer_global=p.defer_global, mix_grid=p.mix_grid, **kwargs)
        self.personalization = p
        if self.personalization.frozen:  # rebuild the trainable list and the optimizer without the frozen modules
            freeze(self.model, self.personalization)
            self._param_names = [n for n, p in self.model.named_parameters() if p.requires_grad]
            self._params = [p for p in self.model.parameters() if p.requires_grad]
            d = self.optimizer.defaults
            self.optimizer = torch.optim.AdamW(self._params, lr=d["lr"], weight_decay=d["weight_decay"])
        self._anchor: dict[str, torch.Tensor] | None = None  # the fleet's last aggregate of the fleet modules
        self._fleet_pending: dict[str, torch.Tensor] | None = None  # blended in when the next round starts

    def _loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        loss, ce, con, logits = super()._loss(batch)
        prox = proximal(self.model, self.personalization, self._anchor)
        return (loss if prox is None else loss + prox), ce, con, logits

    def train_round(self, **kwargs: Any) -> dict[str, Any]:
        self._blend_pending()
        return super().train_round(**kwargs)

    def fleet_state(self) -> dict[str, torch.Tensor]:
        """The personal tensors that travel with the upload (``Personalization.fleet_modules``; empty by default)."""
        with self._lock:
            return fleet_state(self.model, self.personalization)

    def apply_fleet(self, tensors: Mapping[str, torch.Tensor | np.ndarray]) -> None:
        """Take the fleet's aggregate of the fleet modules; it is blended in (``mix``) when the next round starts.

        Why not now: the model keeps serving with the head it fine-tuned on the site's data; a round starts from
        the fleet's head and fine-tunes it again (FedBABU/FedRep), so what is served is always site-tuned. The
        aggregate is also Ditto's anchor. Validated first (``AdapterMismatchError`` / ``NonFiniteAdapterError``
        change nothing).
        """
        with self._lock:
            checked = check_fleet(self.model, self.personalization, tensors)
            self._anchor = {n: t.to(self.device) for n, t in checked.items()}
            self._fleet_pending = checked

    def _blend_pending(self) -> None:
        """Install a deferred global; blend the pending fleet aggregate in, resetting its modules' Adam moments."""
        with self._lock:
            if self._fleet_pending is None:
                return
            blend(self.model, self.personalization, self._fleet_pending)
            self._fleet_pending = None
            if self.reset_shared_optimizer_state:
                for param in fleet_params(self.model, self.personalization).values():
                    self.optimizer.state.pop(param, None)


__all__ = ["FleetTrainer", "Personalization", "blend", "check_fleet", "fleet_params", "fleet_state", "freeze",
           "proximal"]
