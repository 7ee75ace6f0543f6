"""The aggregator's state machine, synchronous and network-free.

Per upload: reassemble → decode → admit (validate, dedup, neutralise; ``admission.py``) → staleness
weight → persist (ledger) → acknowledge (the site's feedback lists the seq, with no tensors: ``feedback.py``)
→ buffer.  A refusal is counted and (rate-limited) logged, and changes nothing else: no ledger row, no version, no seq,
and a feedback only to a site the cloud knows (one with an accepted upload, or provisioned), so
garbage on made-up topics cannot create retained messages.  Per aggregation: pending updates → strategy →
server optimizer → commit (ledger) → broadcast (global + every site's feedback, giving its view).  Every method
returns the ``Outgoing`` messages to publish, in order; nothing is published before the state
it announces is on disk, which is what makes a crash at any point recoverable.

Not thread-safe on purpose: the service calls it from one single-worker executor.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from broker.chunking import Reassembler
from broker.errors import WireError
from broker.inbox import Inbox
from broker.topics import Channel
from broker.topics import parse as parse_topic
from broker.wire import AdapterUpdate, Kind, decode_envelope
from broker.wire.bodies import decode_body

from .admission import Admission
from .config import CloudConfig
from .contribution import Contribution, GlobalState
from .drift import relative_drift
from .errors import BadMetadata, RejectedUpdate
from .feedback import SiteFeedbacks
from .intake import to_contribution, wire_reason
from .ledger import open_ledger
from .messages import Outgoing, SeqReserve, global_event, global_message, metrics_message
from .mixing import mix, step_sizes
from .ratelog import RateLimitedLog
from .reference import open_reference
from .server_opt import check_compatible, get_server_optimizer
from .sites import SiteBook, SiteProfile
from .staleness import BufferPolicy, StalenessPolicy, get_discount
from .strategies import get_strategy

log = logging.getLogger(__name__)


class AggregatorCore:
    """Owns the ledger, the current global and every policy; see the module docstring."""

    def __init__(self, config: CloudConfig, clock: Callable[[], float] = time.monotonic,
                 epoch: int | None = None) -> None:
        """``epoch``: the lease this replica holds (replicated ledger); every ledger write is fenced by it."""
        self.config = config
        self.clock = clock
        agg, lim = config.aggregation, config.limits
        self.state_dir = Path(config.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # process-wide BLAS/LAPACK threads (numpy's); SVDs on a small box should not starve the broker
        threadpool_limits(lim.torch_threads)

        self.strategy = get_strategy(agg.strategy, **agg.strategy_options)
        self.strategy.cap_share(agg.max_share)
        self.optimizer = get_server_optimizer(agg.server_optimizer, **agg.server_optimizer_options)
        check_compatible(self.strategy.factor_space, self.optimizer)
        self.staleness = StalenessPolicy(
            get_discount(agg.discount, **agg.discount_options),
            max_staleness=None if agg.max_staleness < 0 else agg.max_staleness,
        )

        self.ledger = open_ledger(config.ledger.url, self.state_dir, epoch=epoch)
        try:
            latest = self.ledger.latest_global()
            reference, initial = open_reference(self.state_dir, config.model, need_initial=latest is None)
            if latest is None:
                assert initial is not None
                latest = GlobalState(
                    version=0, tensors=initial, strategy=self.strategy.name, meta={"contributors": []}
                )
                self.ledger.commit_global(latest, [])
            self.glob: GlobalState = latest
            self.fingerprint = reference.fingerprint
            self.optimizer.load_state_dict(self.ledger.server_state())
            self.admission = Admission(config, reference, self.ledger, require_b=self.strategy.shares_b)
            self.sites = SiteBook(self.state_dir, history=lim.feedback_history, store=self.ledger.docs)
            self.seqs = SeqReserve(self.state_dir, store=self.ledger.docs)
        except BaseException:
            self.ledger.close()
            raise

        self.inbox = Inbox(
            Reassembler(
                max_transfers=lim.max_transfers,
                max_bytes=lim.max_reassembly_bytes,
                max_transfer_bytes=lim.max_payload_bytes,
                timeout_s=lim.chunk_timeout_s,
            ),
            max_payload=lim.max_payload_bytes,
            opener=config.signing.upload_opener(),
        )
        self.signer = config.signing.signer()
        """Signs every global and site feedback (None: unsigned); edges pin its public key."""
        self.feedback = SiteFeedbacks(config, self.strategy, self.sites, self.ledger, self.seqs, self.signer)
        self.buffer = BufferPolicy(k=agg.buffer_k, period_s=agg.buffer_period_s or None, min_updates=agg.min_updates)
        self.buffer.start(self.clock(), pending=self.ledger.pending_count())
        accepted, rejected = self.ledger.counts()
        self.accepted = accepted
        self.rejected: Counter[str] = Counter(rejected)
        self.bytes_in = 0
        self.bytes_out = 0
        self.wire_errors = 0
        #: uploads accepted but neutralised: factor gauge fixed, sample count clipped
        self.neutralised: Counter[str] = Counter()
        self.reject_log = RateLimitedLog(log, per_window=lim.reject_logs_per_minute, clock=clock)
        self.last_aggregation_ms = float(self.glob.meta.get("aggregation_ms", 0.0))
        # cache sentinels (pragma: equivalent mutants: any start value is recomputed on first use)
        self._global_out: Outgoing | None = None  # pragma: no mutate
        self._global_version = -1  # pragma: no mutate
        log.info("cloud %s resumes at version %d (%d pending) with strategy %s",  # pragma: no mutate (log text)
                 config.cloud_id, self.glob.version, self.buffer.pending, self.strategy.name)  # pragma: no mutate

    def close(self) -> None:
        self.ledger.close()

    def check_lease(self) -> None:
        """Raise ``LeaseLost`` if another replica leads now (replicated ledger; a no-op on sqlite)."""
        self.ledger.check_lease()

    @property
    def version(self) -> int:
        return self.glob.version

    # ---- start-up / reconnect ----------------------------------------------------------------
    def announce(self) -> list[Outgoing]:
        """Re-publish the retained global and every known site's view of it (after a (re)connect or crash)."""
        out = [self._global_message()]
        out += [self.feedback.view(site, self.glob) for site in sorted(self.sites.profiles)]
        out += self.maybe_aggregate()  # a restart may find a full buffer
        return out

    # ---- uploads -------------------------------------------------------------------------------
    def ingest(self, topic: str, payload: bytes) -> list[Outgoing]:
        """Handle one MQTT message from an adapter uplink (whole or chunk)."""
        self.bytes_in += len(payload)
        try:
            got = self.inbox.accept(topic, payload)
        except WireError as exc:
            return self._wire_refusal(topic, payload, exc)
        if got is None:
            return []  # a chunk stored, transfer incomplete
        parsed, env = got
        if parsed.channel is not Channel.ADAPTER_UP or parsed.site is None:
            self.wire_errors += 1
            return []
        site = parsed.site
        try:
            if env.kind is not Kind.ADAPTER:
                raise BadKind(f"expected an adapter, got {env.kind.value!r}")
            update = decode_body(env)
        except BadKind as exc:
            return self._reject(site, env.seq, "wrong_kind", str(exc))
        except WireError as exc:
            return self._reject(site, env.seq, wire_reason(exc), str(exc))
        assert isinstance(update, AdapterUpdate)
        try:
            if update.site != site:
                raise BadMetadata(f"body says site {update.site!r}, topic says {site!r}")
            adm = self.admission.admit(site, to_contribution(update), self._view_of)
            c = adm.contribution
            weight = self.staleness.weight(self.version, c.base_version)
            self.ledger.accept(c, received_version=self.version, weight=weight, norm=adm.norm, digest=adm.digest,
                               steps=adm.steps)
        except RejectedUpdate as exc:
            return self._reject(site, update.seq, exc.reason, exc.detail)
        # durable from here on: now it may be acknowledged
        self.admission.accepted(adm)
        self.neutralised["factor_gauge"] += adm.rebalanced
        self.neutralised["samples_clipped"] += int(adm.clipped_samples)
        self.neutralised["steps_clipped"] += adm.clipped_steps
        self.accepted += 1
        self.sites.accepted(site, update)
        self.buffer.arrived()
        log.debug("accepted %s#%d for site %s (base %d)",  # pragma: no mutate (log text)
                  c.edge_id, c.seq, site, c.base_version)  # pragma: no mutate (log text)
        return [self.feedback.ack(site, self.glob), *self.maybe_aggregate()]

    def _wire_refusal(self, topic: str, payload: bytes, exc: WireError) -> list[Outgoing]:
        """A message that never became an envelope we could read: attribute it to a site if we can."""
        self.wire_errors += 1
        try:
            site = parse_topic(topic).site
        except (WireError, ValueError):  # whatever a hostile topic makes the parser raise
            site = None
        if site is None:
            self.rejected[wire_reason(exc)] += 1
            return []
        try:
            seq = decode_envelope(payload).seq  # a chunk's envelope carries the transfer's seq
        except WireError:
            seq = 0
        return self._reject(site, seq, wire_reason(exc), str(exc))

    def _reject(self, site: str, seq: int, reason: str, detail: str) -> list[Outgoing]:
        """Count, log (rate-limited) and tell a known site; no disk write, no new retained topic."""
        self.rejected[reason] += 1
        self.reject_log.log(reason, "rejected %s#%d: %s %s", site, seq, reason, detail[:200])  # pragma: no mutate
        if site not in self.sites.profiles and not self.admission.known(site):
            return []
        self.sites.rejected(site, seq, reason)
        return [self.feedback.ack(site, self.glob)]

    # ---- aggregation -----------------------------------------------------------------------------
    def maybe_aggregate(self) -> list[Outgoing]:
        """Aggregate if the FedBuff trigger says so (K arrivals or the timer)."""
        if not self.buffer.should_aggregate(self.clock()):
            return []
        return self.aggregate()

    def aggregate(self) -> list[Outgoing]:
        """Consume every pending update into the next version, commit it, then broadcast."""
        pend = self.ledger.pending()
        now = self.clock()
        if not pend:
            self.buffer.aggregated(now, consumed=0)
            return []
        t0 = time.perf_counter()
        current = self.version
        contributions = [p.contribution for p in pend]
        stale = [current - c.base_version for c in contributions]
        # re-evaluated at aggregation time (FedBuff): an update waits in the buffer at most one version
        discounts = [self.staleness.discount(s) for s in stale]
        scaled = self.config.aggregation.staleness_step and self.strategy.factor_space
        agg = self.strategy.aggregate(self.glob, contributions, discounts)
        if scaled:
            agg.tensors = mix(self.glob.tensors, agg.tensors, step_sizes(self.strategy, contributions, discounts))
        stepped = self.optimizer.step(self.glob.tensors, agg.tensors)
        # the aggregate already carries every tensor the strategy keeps; one it dropped stays dropped
        # (fedsa's B is personal: the optimizer's "keep what only the current global has" would revive
        # v0's B in every global, and an edge of the global's rank would load it over its own)
        tensors = {name: stepped[name] for name in agg.tensors}
        new = GlobalState(version=current + 1, tensors=tensors, strategy=self.strategy.name, meta=dict(agg.meta))
        ms = (time.perf_counter() - t0) * 1000.0
        site_stats = self._site_stats(new, contributions, stale, discounts, scaled)
        new.meta.update(
            contributors=sorted({c.edge_id for c in contributions}),
            n_updates=len(pend),
            staleness={"mean": sum(stale) / len(stale), "max": max(stale)},
            aggregation_ms=ms,
            site_stats=site_stats,
            fingerprint=self.fingerprint,
        )
        self.ledger.commit_global(new, [p.id for p in pend], self.optimizer.state_dict())
        norms = global_norms(self.glob.tensors, new.tensors)
        self.glob = new
        self.last_aggregation_ms = ms
        self.buffer.aggregated(now)
        if self.config.limits.keep_globals:
            self.ledger.prune(self.config.limits.keep_globals)
        log.info("version %d from %d updates (%.1f ms)", new.version, len(pend), ms)  # pragma: no mutate (log text)
        out = [self._global_message()]
        out += [self.feedback.view(site, self.glob) for site in sorted(self.sites.profiles)]
        out.append(self.metrics_message())
        out.append(global_event(self.config.cloud_id, new, norms, dict(self.rejected)))
        return out

    def _site_stats(
        self, new: GlobalState, cs: list[Contribution], stale: list[int], discounts: list[float], scaled: bool
    ) -> dict[str, dict[str, float]]:
        """Per site: its weight in this aggregation, staleness, discount, drift from the new global.

        ``weight`` is the coefficient of the site's update in the step (by samples):
        ``d_k n_k / Σ n`` with the FedBuff step, ``d_k n_k / Σ d n`` without it.
        """
        raw = [d * c.samples for d, c in zip(discounts, cs, strict=True)]
        total = sum(c.samples for c in cs) if scaled else sum(raw)
        shares = [r / total if total > 0 else 1.0 / len(cs) for r in raw]
        out: dict[str, dict[str, float]] = {}
        for c, s, d, w in zip(cs, stale, discounts, shares, strict=True):
            site = self.sites.site_of(c.edge_id)
            # equivalent to c.modalities today (a site's last update in a batch is its latest accepted one),
            # but the site's profile is what its views are cut by
            prof = self.sites.get(site)  # pragma: no mutate (equivalent, see above)
            mods = prof.modalities if prof is not None else c.modalities  # pragma: no mutate (equivalent)
            drift = relative_drift(c, new, lambda name, m=mods: self.strategy.wants(name, m))
            st = out.setdefault(site, {"weight": 0.0, "updates": 0.0, "samples": 0.0})
            st["weight"] += w
            st["updates"] += 1
            st["samples"] += c.samples
            st["staleness"] = float(s)  # of its latest update in the batch
            st["discount"] = float(d)
            st["seq"] = float(c.seq)
            if drift is not None:
                st["drift"] = drift
        return out

    # ---- messages ------------------------------------------------------------------------------
    def _global_message(self) -> Outgoing:
        if self._global_out is None or self._global_version != self.version:
            # one seq per version: a re-publish after reconnect is the same message, not a new one
            self._global_out = global_message(
                self.glob,
                sender=self.config.cloud_id,
                seq=self.seqs.take(),
                fingerprint=self.fingerprint,
                default_rank=self.config.model.lora_r,
                signer=self.signer,
            )
            self._global_version = self.version
        return self._global_out

    def view(self, prof: SiteProfile) -> dict[str, np.ndarray]:
        """The site's rank-, alpha- and modality-specific view of the current global (cached per version)."""
        return self.feedback.tensors(self.glob, prof)

    def _view_of(self, c: Contribution) -> dict[str, np.ndarray]:
        """The current global as an edge of ``c``'s rank, alpha and modalities loads it (steps are judged from it)."""
        return self.strategy.view_for(self.glob, rank=c.rank, modalities=c.modalities, alpha=c.alpha)

    def metrics(self) -> dict[str, Any]:
        meta = self.glob.meta
        st = meta.get("staleness", {"mean": 0.0, "max": 0})
        return {
            "version": self.version,
            "strategy": self.strategy.name,
            "contributors": len(meta.get("contributors", [])),
            "staleness": {"mean": float(st["mean"]), "max": int(st["max"])},
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "aggregation_ms": self.last_aggregation_ms,
            "accepted": self.accepted,
            "rejected": sum(self.rejected.values()),
            "rejected_reasons": dict(self.rejected),
            "pending": self.buffer.pending,
            "sites": len(self.sites.profiles),
            "wire_errors": self.wire_errors,
            "neutralised": dict(self.neutralised),
            "log_suppressed": self.reject_log.suppressed_total,
        }

    def metrics_message(self) -> Outgoing:
        return metrics_message(self.config.cloud_id, self.metrics())

    def sent(self, nbytes: int) -> None:
        self.bytes_out += nbytes


def global_norms(old: dict[str, Any], new: dict[str, Any]) -> dict[str, float]:
    """L2 norms a dashboard plots per version: the new global's, and its step from the previous one (float64)."""
    total = 0.0
    step = 0.0
    for name, t in new.items():
        t64 = np.asarray(t, dtype=np.float64)
        total += float((t64 * t64).sum())
        before = old.get(name)
        if before is not None and tuple(before.shape) == tuple(t64.shape):
            t64 = t64 - np.asarray(before, dtype=np.float64)
        step += float((t64 * t64).sum())
    return {"global": total ** 0.5, "step": step ** 0.5}


class BadKind(Exception):
    """An uplink envelope that is not an adapter update."""
