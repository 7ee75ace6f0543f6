"""Each site's feedback: the verdicts on its uploads, its statistics, and how it gets its view of the global.

Why a view seldom travels as tensors: every edge receives the retained global after an aggregation anyway,
and for most rules a site's view is a cut of it (its first ``r`` components, ``B`` rescaled to the site's
``alpha / r``, only the modalities it has data for; :mod:`megace_common.views`), which the edge performs
itself, bit for bit. So the feedback names the cut (``view = "global"``) and carries tensors only where the
rule views a module the site receives its own way (FLoRA's stacked modules: ``view = "tensors"``).
An acknowledgement of an upload never carries tensors: it names the cut of the current version when there
is one, else no view at all (``view = "none"``). A round then moves about 3N+1 adapter copies through the
broker (N uploads in and out, one global in and N out) instead of 7N+1.

A feedback is retained when it gives the site its view, so the retained message on a site's topic always
brings a (re)connecting edge to the current version; an acknowledgement without a view is published
unretained and leaves that message in place.

``aggregation.feedback_tensors = "always"`` restores the old traffic, for fleets with edges that predate
view cuts: every feedback carries the site's full view as tensors, acknowledgements too, all retained.
"""

from __future__ import annotations

import math

import numpy as np

from broker.signing import Signer
from broker.wire.bodies import VIEW_NONE, VIEW_TENSORS, FeedbackView

from .config import CloudConfig
from .contribution import GlobalState, to_numpy
from .ledger_base import LedgerBackend
from .messages import Outgoing, SeqReserve, feedback_message
from .sites import SiteBook, SiteProfile
from .strategies import Strategy

ALWAYS = "always"
"""``aggregation.feedback_tensors``: every feedback carries the site's view as tensors (the old traffic)."""


class SiteFeedbacks:
    """Builds each site's feedback from the current global; caches each view's tensors per version."""

    def __init__(self, config: CloudConfig, strategy: Strategy, sites: SiteBook, ledger: LedgerBackend,
                 seqs: SeqReserve, signer: Signer | None) -> None:
        self.config = config
        self.strategy = strategy
        self.sites = sites
        self.ledger = ledger
        self.seqs = seqs
        self.signer = signer
        self.always = config.aggregation.feedback_tensors == ALWAYS
        # cache sentinels (pragma: equivalent mutants: any start value is recomputed on first use)
        self._views: dict[tuple[int, float, frozenset[str]], dict[str, np.ndarray]] = {}  # pragma: no mutate
        self._views_version = -1  # pragma: no mutate

    def ack(self, site: str, g: GlobalState) -> Outgoing:
        """The answer to an upload: verdicts and statistics, the cut of ``g`` where there is one, no tensors."""
        return self._message(site, g, give_view=False)

    def view(self, site: str, g: GlobalState) -> Outgoing:
        """After an aggregation or a (re)connect: the site's view of ``g`` (a cut, or tensors where it is not one)."""
        return self._message(site, g, give_view=True)

    def tensors(self, g: GlobalState, prof: SiteProfile) -> dict[str, np.ndarray]:
        """The site's rank-, alpha- and modality-specific view of ``g`` as arrays (cached per version)."""
        if self._views_version != g.version:
            self._views, self._views_version = {}, g.version
        key = prof.view_key()
        if key not in self._views:
            v = self.strategy.view_for(g, rank=prof.rank, modalities=prof.modalities, alpha=prof.alpha)
            self._views[key] = to_numpy(v)
        return self._views[key]

    def _message(self, site: str, g: GlobalState, *, give_view: bool) -> Outgoing:
        prof = self.sites.get(site)
        stats: dict[str, float] = {"version": float(g.version)}
        if prof is None:  # never accepted: no rank to cut a view for, only the refusals
            rejected = self.sites.unknown_rejections.get(site, [])
            return self._encode(site, g, 0, FeedbackView(VIEW_NONE), {}, stats, [], rejected)
        last = g.meta.get("site_stats", {}).get(site)
        if last is not None:
            stats.update({k: float(v) for k, v in last.items() if math.isfinite(float(v))})
        else:
            stats.update(weight=0.0, updates=0.0)
        stats["last_seq"] = float(prof.last_seq)
        cut = None if self.always else self.strategy.cut_for(g, prof.rank, prof.modalities, prof.alpha)
        if cut is not None:
            view, tensors = cut.to_wire(), {}
        elif give_view or self.always:
            view, tensors = FeedbackView(VIEW_TENSORS), self.tensors(g, prof)
        else:
            view, tensors = FeedbackView(VIEW_NONE), {}
        accepted = self.ledger.accepted_seqs(prof.edge, self.config.limits.feedback_history)
        return self._encode(site, g, prof.rank, view, tensors, stats, accepted, prof.rejected)

    def _encode(self, site: str, g: GlobalState, rank: int, view: FeedbackView, tensors: dict[str, np.ndarray],
                stats: dict[str, float], accepted: list[int], rejected: list[tuple[int, str]]) -> Outgoing:
        return feedback_message(
            site, sender=self.config.cloud_id, seq=self.seqs.take(), version=g.version, rank=rank, view=view,
            tensors=tensors, stats=stats, accepted=accepted, rejected=rejected,
            retain=self.always or view.mode != VIEW_NONE, signer=self.signer,
        )
