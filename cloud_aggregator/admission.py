"""Everything between a decoded upload and the ledger: who may send, validation, and neutralisation.

Order, cheapest first, each refusal a typed ``RejectedUpdate`` that changes no state:

1. the site allow-list (when configured): ``unknown_site``;
2. ``Validator``: metadata, fingerprint, seq dedup/replay, shapes, finiteness, and the norm of the
   *effective* update ``‖s·B A‖_F`` (rxr Gram form) against an absolute bound armed from the first
   upload plus the robust band of recent accepted norms;
3. content dedup: the sha256 of the tensors, refused if the same edge already had it accepted under
   another seq (``duplicate_content``): a replay with a fresh seq;

then what passes is neutralised rather than refused: the claimed sample count is clipped to
``max_samples`` (and each modality count to the sample count), the factor gauge is fixed
(``balance.py``), and each module's step from the current global is clipped (``steps.py``).
The absolute bound defaults to ``max_norm_ratio`` (10) x ‖W0‖_F of the frozen weights the adapter
modifies: an adapter ten times larger than the layers it adapts is not fine-tuning.  The closed
loop's honest adapters stay below 0.8 x ‖W0‖ (tiny backbone, 6 rounds), so the default leaves them 12x headroom.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from .balance import balance
from .config import CloudConfig
from .contribution import Contribution
from .errors import DuplicateContent, UnknownSite
from .ledger_base import LedgerBackend
from .reference import Reference
from .steps import StepBound
from .validation import NormGuard, Validator

#: what an edge of this upload's rank, alpha and modalities would load from the current global
ViewOf = Callable[[Contribution], dict[str, np.ndarray]]


@dataclass(frozen=True)
class Admitted:
    """An update that passed: the (neutralised) contribution to persist, its norm and content digest."""

    contribution: Contribution
    norm: float
    digest: str
    rebalanced: int = 0
    clipped_samples: bool = False
    #: each module's step from the current global after clipping, and how many were clipped
    steps: dict[str, float] = field(default_factory=dict)
    clipped_steps: int = 0


def content_digest(c: Contribution) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order (independent of the seq)."""
    h = hashlib.sha256()
    for name in sorted(c.tensors):
        arr = np.ascontiguousarray(c.tensors[name])
        h.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


class Admission:
    """One per core; owns the validator (and its norm guard, re-armed from the ledger)."""

    def __init__(self, config: CloudConfig, reference: Reference, ledger: LedgerBackend, *, require_b: bool) -> None:
        val = config.validation
        self.ledger = ledger
        self.sites = frozenset(val.sites)
        self.max_samples = val.max_samples
        self.band = val.factor_band
        self.a_rms = dict(reference.a_rms)
        self.max_norm = val.max_norm or (val.max_norm_ratio * reference.base_norm) or None
        guard = (
            NormGuard(
                z_max=val.z_max or None,
                ratio_max=val.ratio_max or None,
                min_history=val.min_history,
                min_spread=val.min_spread,
                window=val.window,
                max_norm=self.max_norm,
            )
            if val.norm_guard
            else None
        )
        self.validator = Validator(
            fingerprint=reference.fingerprint,
            schema=reference.schema,
            max_rank=config.model.lora_r,
            norm_guard=guard,
            seen=ledger.seen,
            last_seq=ledger.last_seq,
            require_b=require_b,
        )
        if guard is not None:  # a restart must not disarm the statistical band
            for norm in ledger.recent_norms(guard.window):
                guard.observe(norm)
        self.steps: StepBound | None = None
        if val.step_multiplier > 0:
            self.steps = StepBound(
                multiplier=val.step_multiplier,
                cold_bound=val.step_cold_ratio * reference.base_norm or None,
                min_history=val.min_history,
                window=val.step_window,
            )
            # every module's history is at most step_window long, so that many rows re-arm all of them
            self.steps.rearm(ledger.recent_steps(val.step_window * max(len(reference.schema.modules), 1)))

    def known(self, site: str) -> bool:
        """Provisioned: on the allow-list (when one is configured)."""
        return site in self.sites

    def admit(self, site: str, c: Contribution, view_of: ViewOf | None = None) -> Admitted:
        """Raise a ``RejectedUpdate`` or return what to persist; touches no state either way.

        ``view_of`` gives the current global as the upload's edge would load it; without it (or with
        step clipping off) steps are neither measured nor clipped.
        """
        if self.sites and site not in self.sites:
            raise UnknownSite(f"site {site!r} is not provisioned")
        norm = self.validator.validate(c)
        digest = content_digest(c)
        if self.ledger.seen_content(c.edge_id, digest):
            raise DuplicateContent(f"{c.edge_id}#{c.seq}: these tensors were already accepted")
        clipped = 0 < self.max_samples < c.samples
        if clipped:
            c = replace(c, samples=self.max_samples)
        if any(n > c.samples for n in c.modalities.values()):
            c = replace(c, modalities={m: min(n, c.samples) for m, n in c.modalities.items()})
        c, changed = balance(c, self.a_rms, self.band)
        steps: dict[str, float] = {}
        cut = 0
        if self.steps is not None and view_of is not None:
            c, steps, cut = self.steps.clip(c, view_of(c))
        return Admitted(c, norm, digest, changed, clipped, steps, cut)

    def accepted(self, admitted: Admitted) -> None:
        """Feed the norm guard and the step bound once the update is durably accepted."""
        self.validator.accepted(admitted.norm)
        if self.steps is not None:
            self.steps.observe(admitted.steps)
