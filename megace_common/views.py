"""A site's view of the global adapter, cut in one place for the cloud and for the edges.

Why one place: after an aggregation every edge receives the retained global anyway, so for most rules the
cloud tells a site "your view of version v is the global, cut like this" (``site_feedback.view = "global"``)
instead of sending the same tensors a second time, and the edge cuts it itself. That only works if both
sides cut bit for bit alike, so both call :func:`cut_view`: the cloud's strategies for every module whose
view is such a cut, the edge on the global it received.

The cut of a global stored at scaling ``sent`` (the cloud's global is at 1, see
``cloud_aggregator.contribution``) for a receiver of LoRA rank ``rank`` and scaling ``alpha / r``:

* a LoRA ``A`` (``(r_g, in)``) keeps its first ``rank`` rows, a ``B`` (``(out, r_g)``) its first ``rank``
  columns, zero-padded where the global has fewer (a zero pair adds nothing to ``B @ A``);
* ``B`` is rescaled from ``sent`` to the receiver's scaling (:func:`megace_common.lora.rescale_b`), ``A`` is not;
* a tensor tied to a modality outside ``modalities`` is left out (the receiver keeps its own), and so is a
  factor the rule does not share (fedsa keeps ``B`` at the edge); other tensors pass unchanged.

numpy only (no torch): the edge's wire arrays and the cloud's tensors, as numpy views, take the same path.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

from broker.wire.bodies import VIEW_GLOBAL, FeedbackView
from megace_common.lora import modality_of, rescale_b, split_lora


def keeps_modality(name: str, modalities: frozenset[str] | None) -> bool:
    """Whether a tensor or module ``name`` belongs in a view limited to ``modalities`` (None: no limit)."""
    mod = modality_of(name)
    return mod is None or modalities is None or mod in modalities


@dataclass(frozen=True)
class ViewCut:
    """How one receiver's view is cut from the global; see the module docstring."""

    rank: int
    scaling: float = 1.0
    """The receiver's LoRA scaling ``alpha / r``: ``B`` is divided by it (from a global at scaling 1)."""
    modalities: frozenset[str] | None = None
    share_a: bool = True
    share_b: bool = True

    def keeps(self, name: str) -> bool:
        """Whether the view holds tensor (or module) ``name``, as far as modalities go."""
        return keeps_modality(name, self.modalities)

    def to_wire(self) -> FeedbackView:
        """What a site feedback says so that the site cuts this view itself (its rank is the body's ``rank``)."""
        mods = None if self.modalities is None else tuple(sorted(self.modalities))
        return FeedbackView(VIEW_GLOBAL, mods, ("A" if self.share_a else "") + ("B" if self.share_b else ""))

    @classmethod
    def from_wire(cls, view: FeedbackView, *, rank: int, scaling: float) -> ViewCut:
        """The cut a feedback names, for a receiver of ``rank`` with its own ``scaling``."""
        mods = None if view.modalities is None else frozenset(view.modalities)
        return cls(rank, scaling, mods, "A" in view.factors, "B" in view.factors)


def fit_rank(t: np.ndarray, kind: Literal["A", "B"], rank: int) -> np.ndarray:
    """A new array: the first ``rank`` components of a LoRA factor (rows of A, columns of B), zero-padded."""
    axis = 0 if kind == "A" else 1
    have = t.shape[axis]
    if have >= rank:
        return (t[:rank] if axis == 0 else t[:, :rank]).copy()
    pad = [(0, 0)] * t.ndim
    pad[axis] = (0, rank - have)
    return np.pad(t, pad)


def cut_view(tensors: Mapping[str, np.ndarray], cut: ViewCut, *, sent_scaling: float = 1.0) -> dict[str, np.ndarray]:
    """The receiver's view of a global (``tensors`` at ``sent_scaling``), as new arrays in the global's order.

    Raises ``ValueError`` for a LoRA factor that is not a matrix (nothing to cut a rank from).
    """
    out: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        if not cut.keeps(name):
            continue
        t = np.asarray(value)
        parts = split_lora(name)
        if parts is None:
            out[name] = t.copy()
            continue
        if t.ndim != 2:
            raise ValueError(f"{name}: a LoRA factor is a matrix, got shape {t.shape}")
        if parts[1] == "A":
            if cut.share_a:
                out[name] = fit_rank(t, "A", cut.rank)
        elif cut.share_b:
            out[name] = rescale_b(fit_rank(t, "B", cut.rank), sent_scaling, cut.scaling)
    return out
