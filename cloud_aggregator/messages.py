"""What the cloud publishes, encoded: the global, per-site feedback, status and metrics.

Encoding happens next to the state it reads (in the aggregation executor); the asyncio side
only sends the resulting ``Outgoing`` messages, in order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from broker import topics
from broker.signing import Signer
from broker.topics import Role
from broker.wire import GlobalAdapter, Kind, Rejection, SiteFeedback, encode_envelope, metrics_payload
from broker.wire.bodies import FeedbackView
from broker.wire.status import event_payload
from megace_common.durable import atomic_write

from .contribution import GlobalState
from .ledger_base import DocStore

SEQ_FILE = "outseq.json"
SEQ_BLOCK = 10_000


@dataclass(frozen=True)
class Outgoing:
    """One message to publish (chunked by the sender if needed)."""

    topic: str
    payload: bytes
    retain: bool = False
    seq: int = 0


class SeqReserve:
    """Envelope seqs strictly increasing across restarts, by reserving blocks on disk.

    Receivers drop a seq at or below the last one seen, so a restarted cloud must never reuse
    one; persisting every seq would cost an fsync per message, a block costs one per 10,000.  With a replicated
    ledger the reservation lives in its ``store``: all replicas share one sender id, so a replica taking over
    continues above every seq the previous leader could have used.
    """

    def __init__(self, state_dir: Path, block: int = SEQ_BLOCK, store: DocStore | None = None) -> None:
        self.path = state_dir / SEQ_FILE
        self.store = store
        self.block = block
        raw = store.read_doc(SEQ_FILE) if store is not None else (
            self.path.read_bytes() if self.path.exists() else None)
        start = json.loads(raw)["reserved"] if raw is not None else 0
        self.next = int(start)
        self.limit = self.next
        self._reserve()

    def _reserve(self) -> None:
        self.limit = self.next + self.block
        body = json.dumps({"reserved": self.limit}).encode()
        if self.store is not None:
            self.store.write_doc(SEQ_FILE, body)
        else:
            atomic_write(self.path, body)

    def take(self) -> int:
        if self.next >= self.limit:
            self._reserve()
        self.next += 1
        return self.next


def global_rank(g: GlobalState, default: int) -> int:
    ranks = [g.rank_of(m) for m in g.modules()]
    return max(ranks) if ranks else default


def global_message(
    g: GlobalState, *, sender: str, seq: int, fingerprint: str, default_rank: int, signer: Signer | None = None
) -> Outgoing:
    """The retained global, at scaling 1: ``rank`` is the largest module rank and ``alpha = rank``,
    so an edge that loads the factors as they are gets ``(alpha/rank)·B A = B A`` exactly."""
    rank = global_rank(g, default_rank)
    body = GlobalAdapter(
        version=g.version,
        base_model=fingerprint,
        strategy=g.strategy,
        rank=rank,
        alpha=float(rank),
        tensors=g.arrays(),
        contributors=list(g.meta.get("contributors", [])),
    ).to_body()
    return Outgoing(topics.global_down(), _signed(encode_envelope(Kind.GLOBAL, sender, seq, body), signer),
                    retain=True, seq=seq)


def feedback_message(
    site: str,
    *,
    sender: str,
    seq: int,
    version: int,
    rank: int,
    view: FeedbackView,
    tensors: dict[str, np.ndarray],
    stats: dict[str, float],
    accepted: list[int],
    rejected: list[tuple[int, str]],
    retain: bool,
    signer: Signer | None = None,
) -> Outgoing:
    """One site's feedback; ``view`` says how the site gets its view of ``version`` (``tensors`` only with
    ``tensors``).  Retained when it gives the view, since it then replaces the last one (``feedback.py``)."""
    body = SiteFeedback(
        site=site,
        version=version,
        rank=rank,
        tensors=tensors,
        stats=stats,
        accepted=accepted,
        rejected=[Rejection(seq=max(int(s), 0), reason=r) for s, r in rejected],
    ).to_body()
    payload = _signed(encode_envelope(Kind.SITE_FEEDBACK, sender, seq, view.add_to(body)), signer)
    return Outgoing(topics.site_feedback(site), payload, retain=retain, seq=seq)


def _signed(envelope: bytes, signer: Signer | None) -> bytes:
    return envelope if signer is None else signer.sign(envelope)


def metrics_message(cloud_id: str, values: dict[str, object]) -> Outgoing:
    """Retained, so a dashboard opened between two ticks shows the latest at once."""
    return Outgoing(topics.metrics(Role.CLOUD, cloud_id), metrics_payload(Role.CLOUD.value, cloud_id, values),
                    retain=True)


def global_event(cloud_id: str, glob: GlobalState, norms: dict[str, float], rejected: dict[str, int]) -> Outgoing:
    """The JSON event of one new global (docs/METRICS.md, ``global``), retained: a dashboard's version timeline."""
    meta = glob.meta
    st = meta.get("staleness", {"mean": 0.0, "max": 0})
    sites = meta.get("site_stats", {})
    data = {
        "version": glob.version,
        "strategy": glob.strategy,
        "contributors": list(meta.get("contributors", [])),
        "updates": int(meta.get("n_updates", 0)),
        "staleness": {"mean": float(st["mean"]), "max": int(st["max"])},
        "norms": norms,
        "aggregation_ms": float(meta.get("aggregation_ms", 0.0)),
        "sites": {site: {k: float(v) for k, v in stats.items()} for site, stats in sites.items()},
        "rejected": dict(rejected),
    }
    payload = event_payload(Role.CLOUD.value, cloud_id, "global", data)
    return Outgoing(topics.events(Role.CLOUD, cloud_id), payload, retain=True)
