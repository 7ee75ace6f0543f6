"""What the cloud remembers about each site, so it can cut and re-send that site's feedback.

A site's rank, alpha and modality counts come from its last *accepted* upload (rejected ones
are not trusted).  Profiles are saved atomically before the upload is acknowledged, so that
after a crash the cloud can re-send every site its view of the current global.  Per-site
statistics live in the global's metadata instead (committed atomically with the version).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from broker.wire import AdapterUpdate
from megace_common.durable import atomic_write

from .ledger_base import DocStore

SITES_FILE = "sites.json"
MAX_UNKNOWN = 1024


@dataclass
class SiteProfile:
    site: str
    edge: str
    rank: int
    alpha: float
    modalities: dict[str, int]
    last_seq: int
    #: recent refusals ``(seq, reason)``, newest last (kept in memory; the ledger has them all)
    rejected: list[tuple[int, str]] = field(default_factory=list)

    def view_key(self) -> tuple[int, float, frozenset[str]]:
        """Sites with equal keys receive identical views (cache key)."""
        return self.rank, self.alpha, frozenset(m for m, n in self.modalities.items() if n > 0)


class SiteBook:
    """Site profiles keyed by site id, persisted to ``sites.json`` (or to ``store``: the replicated ledger's
    documents, so that a replica taking over re-sends every site its view)."""

    def __init__(self, state_dir: Path, history: int = 32, store: DocStore | None = None) -> None:
        self.path = state_dir / SITES_FILE
        self.store = store
        self.history = history
        self.profiles: dict[str, SiteProfile] = {}
        #: refusals of sites that never had an upload accepted
        self.unknown_rejections: dict[str, list[tuple[int, str]]] = {}
        raw = store.read_doc(SITES_FILE) if store is not None else (
            self.path.read_bytes() if self.path.exists() else None)
        if raw is not None:
            for site, doc in json.loads(raw).items():
                doc["rejected"] = [tuple(r) for r in doc.get("rejected", [])]
                self.profiles[site] = SiteProfile(**doc)

    def get(self, site: str) -> SiteProfile | None:
        return self.profiles.get(site)

    def site_of(self, edge: str) -> str:
        """The site an edge uploads for (itself if unknown: one edge per site is the norm)."""
        for p in self.profiles.values():
            if p.edge == edge:
                return p.site
        return edge

    def accepted(self, site: str, update: AdapterUpdate) -> SiteProfile:
        """Record an accepted upload and persist (call before acknowledging it)."""
        old = self.profiles.get(site)
        rejected = old.rejected if old else self.unknown_rejections.pop(site, [])
        prof = SiteProfile(
            site=site,
            edge=update.edge,
            rank=update.rank,
            alpha=float(update.alpha),
            modalities=dict(update.modalities),
            last_seq=update.seq,
            rejected=rejected,
        )
        self.profiles[site] = prof
        self.save()
        return prof

    def rejected(self, site: str, seq: int, reason: str) -> list[tuple[int, str]]:
        """Remember a refusal for the site's feedback; returns the site's recent refusals."""
        prof = self.profiles.get(site)
        if prof is None and site not in self.unknown_rejections and len(self.unknown_rejections) >= MAX_UNKNOWN:
            del self.unknown_rejections[next(iter(self.unknown_rejections))]  # bounded under a flood
        lst = prof.rejected if prof else self.unknown_rejections.setdefault(site, [])
        lst.append((int(seq), reason))
        del lst[: -self.history]
        return lst

    def save(self) -> None:
        doc = {s: asdict(p) for s, p in sorted(self.profiles.items())}
        body = json.dumps(doc, sort_keys=True).encode()
        if self.store is not None:
            self.store.write_doc(SITES_FILE, body)
        else:
            atomic_write(self.path, body)
