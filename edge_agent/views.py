"""Which adapter the edge installs from the cloud: the global, or its site's view (sent, or cut here from the global).

Why cut here: every edge receives the retained global anyway, so the cloud sends a site's view as tensors only
where it is not a cut of that global; otherwise its feedback names the cut (``view = "global"``, see
docs/wire/SPEC.md) and the edge performs it with the function the cloud cuts with
(:func:`megace_common.views.cut_view`), installing exactly the tensors the cloud would have sent.

Order: a feedback that names a cut can arrive before the global it cuts (a chunked global completes after the
small feedback; retained messages on a reconnect come in any order), so the cut waits for its global, and the
newest global is kept here until a newer one replaces it.

Network-free and not thread-safe, like :class:`edge_agent.core.EdgeCore`, which owns one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from broker.metrics import Counters
from broker.wire import GlobalAdapter, SiteFeedback
from broker.wire.bodies import VIEW_GLOBAL, VIEW_NONE, VIEW_TENSORS, FeedbackView
from megace_common.lora import b_factor, is_lora_b, lora_scaling, rescale_b
from megace_common.views import ViewCut, cut_view
from megace_model.errors import AdapterMismatchError


@dataclass(slots=True)
class ApplyJob:
    """A global (``source="global"``) or the site's view of it (``"view"``) to install via ``EdgeCore.apply``."""

    source: str
    version: int
    tensors: dict[str, np.ndarray]
    stats: dict[str, float]


class GlobalViews:
    """Turns the cloud's globals and site feedback into :class:`ApplyJob` s for an edge of one rank and alpha."""

    def __init__(self, rank: int, alpha: float, counters: Counters) -> None:
        self.rank = rank
        self.scaling = lora_scaling(alpha, rank)
        self.counters = counters
        self.latest: GlobalAdapter | None = None
        """The newest global received (wire arrays): what a named cut is cut from."""
        self.awaiting: tuple[int, ViewCut, dict[str, float]] | None = None
        """A cut named for a version whose global has not arrived yet: (version, cut, stats)."""
        self.scheduled = -1
        """The newest version a job was made for (it is installed later, on the training thread)."""
        self.viewed = -1
        """The newest version a view job was made for."""

    def on_global(self, msg: GlobalAdapter, installed: int) -> list[ApplyJob]:
        """The global itself when it is made for this rank (else the site's view follows), and a cut awaiting it."""
        if msg.version < installed:
            self.counters.inc("global_stale")
            return []
        if self.latest is None or msg.version >= self.latest.version:
            self.latest = msg
        jobs = []
        if msg.version == installed:
            self.counters.inc("global_stale")  # kept all the same: the site's view of it may still be cut from it
        elif msg.rank != self.rank:
            self.counters.inc("global_other_rank")  # this edge waits for its site's rank-truncated view
        else:
            jobs.append(self._job("global", msg.version, self._at_own_scaling(msg), {}))
        waiting = self.awaiting
        if waiting is not None and waiting[0] <= msg.version:
            self.awaiting = None
            if waiting[0] == msg.version:
                jobs.append(self._cut(msg, waiting[1], waiting[2]))
        return jobs

    def on_feedback(self, msg: SiteFeedback, view: FeedbackView, stats: dict[str, float], installed: int,
                    source: str) -> list[ApplyJob] | None:
        """The jobs a site feedback asks for; None when it gives nothing to install here (its stats are relayed).

        An acknowledgement without a view (``none``) of a version this edge runs or is installing asks for nothing.
        """
        if msg.rank == self.rank and view.mode == VIEW_TENSORS and msg.tensors:
            return [self._job("view", msg.version, {k: np.array(v) for k, v in msg.tensors.items()}, stats)]
        if msg.rank == self.rank and view.mode == VIEW_GLOBAL:
            cut = ViewCut.from_wire(view, rank=self.rank, scaling=self.scaling)
            return self._named_cut(msg.version, cut, stats, installed, source)
        if view.mode == VIEW_NONE and msg.version <= max(installed, self.scheduled):
            return []
        return None

    def _named_cut(self, version: int, cut: ViewCut, stats: dict[str, float], installed: int,
                   source: str) -> list[ApplyJob]:
        if version < installed or (version == installed and source == "view") or version <= self.viewed:
            self.counters.inc("global_stale")  # installed or on its way: acknowledgements name the cut again
            return []
        latest = self.latest
        if latest is not None and latest.version == version:
            return [self._cut(latest, cut, stats)]
        if latest is None or latest.version < version:
            self.awaiting = (version, cut, stats)
            self.counters.inc("view_awaits_global")
            return []
        self.counters.inc("global_stale")  # a newer global is here: its own view follows it
        return []

    def _cut(self, g: GlobalAdapter, cut: ViewCut, stats: dict[str, float]) -> ApplyJob:
        try:
            tensors = cut_view(g.tensors, cut, sent_scaling=lora_scaling(g.alpha, g.rank))
        except ValueError as exc:  # a malformed global: refused like any adapter that does not fit the model
            raise AdapterMismatchError(f"global v{g.version}: {exc}") from exc
        self.counters.inc("views_cut")
        return self._job("view", g.version, tensors, stats)

    def _at_own_scaling(self, msg: GlobalAdapter) -> dict[str, np.ndarray]:
        """The global's tensors (copied: wire arrays are read-only views), B rescaled to this edge's alpha/r."""
        tensors = {k: np.array(v) for k, v in msg.tensors.items()}
        sent = lora_scaling(msg.alpha, msg.rank)
        if math.isclose(b_factor(sent, self.scaling), 1.0):
            return tensors
        return {k: (rescale_b(v.astype(np.float32), sent, self.scaling) if is_lora_b(k) else v)
                for k, v in tensors.items()}

    def _job(self, source: str, version: int, tensors: dict[str, np.ndarray], stats: dict[str, float]) -> ApplyJob:
        self.scheduled = max(self.scheduled, version)
        if source == "view":
            self.viewed = max(self.viewed, version)
        return ApplyJob(source, version, tensors, stats)
