"""What every ledger backend promises, and the pieces the backends share.

Two backends keep the same record (accepted updates, refusals, globals, small documents):

* :class:`cloud_aggregator.ledger.Ledger`: sqlite + safetensors files under the state directory, the
  embedded default (one process owns it);
* :class:`cloud_aggregator.ledger_pg.PgLedger`: PostgreSQL, tensors included, shared by several cloud
  replicas of which exactly one writes (the lease holder, see ``leader.py``).

Both keep the rules that make recovery exact: ``accept`` is durable before it returns (the caller
acknowledges only afterwards), ``commit_global`` inserts the version and flips exactly the consumed
updates from pending to applied in one transaction, refusing any update that is not pending and any
version that is not the next one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from safetensors.numpy import save as st_save

from megace_common.durable import atomic_write

from .contribution import Contribution, GlobalState


class VersionConflict(RuntimeError):
    """``commit_global`` was asked to skip/repeat a version or re-apply an update."""


class LeaseLost(RuntimeError):
    """This replica may no longer write: another one holds the lease (fenced), or the database is gone."""


@dataclass(frozen=True)
class PendingUpdate:
    """An accepted, not yet aggregated update, with what aggregation needs."""

    id: int
    contribution: Contribution
    weight: float
    received_version: int


class DocStore(Protocol):
    """Small named documents (site profiles, reserved envelope seqs) kept beside the ledger."""

    def read_doc(self, name: str) -> bytes | None: ...

    def write_doc(self, name: str, body: bytes) -> None: ...


class LedgerBackend(Protocol):
    """The ledger as the core, admission and feedback use it (see the module docstring for the guarantees)."""

    #: where site profiles and seq reservations live; None: files in the state directory
    docs: DocStore | None

    def close(self) -> None: ...
    def check_lease(self) -> None: ...
    def seen(self, edge_id: str, seq: int) -> bool: ...
    def seen_content(self, edge_id: str, digest: str) -> bool: ...
    def last_seq(self, edge_id: str) -> int | None: ...
    def accept(self, c: Contribution, received_version: int, weight: float, norm: float | None = None,
               digest: str | None = None, steps: dict[str, float] | None = None) -> int: ...
    def reject(self, edge_id: str, seq: int | None, reason: str, detail: str = "",
               base_version: int | None = None, received_version: int | None = None) -> None: ...
    def rejections(self) -> list[tuple[str, int | None, str]]: ...
    def accepted_seqs(self, edge_id: str, limit: int = 32) -> list[int]: ...
    def recent_norms(self, limit: int) -> list[float]: ...
    def recent_steps(self, limit: int) -> list[dict[str, float]]: ...
    def counts(self) -> tuple[int, dict[str, int]]: ...
    def applied_in(self, version: int) -> list[tuple[str, int]]: ...
    def pending_count(self) -> int: ...
    def pending(self, limit: int | None = None) -> list[PendingUpdate]: ...
    def applied_updates(self, version: int) -> list[PendingUpdate]: ...
    def latest_version(self) -> int | None: ...
    def commit_global(self, g: GlobalState, applied: Iterable[int],
                      server_state: dict[str, np.ndarray] | None = None) -> None: ...
    def latest_global(self) -> GlobalState | None: ...
    def load_global(self, version: int) -> GlobalState: ...
    def server_state(self, version: int | None = None) -> dict[str, np.ndarray]: ...
    def prune(self, keep_globals: int = 3) -> int: ...


def tensor_bytes(tensors: dict[str, np.ndarray], meta: dict[str, str] | None = None) -> bytes:
    """One safetensors blob (views and non-contiguous arrays are fine)."""
    own = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    return st_save(own, metadata=meta)


def save_tensors(path: Path, tensors: dict[str, np.ndarray], meta: dict[str, str] | None = None) -> None:
    """Write ``tensors`` as one safetensors file, atomically."""
    atomic_write(path, tensor_bytes(tensors, meta))


#: the columns of ``updates`` an ``accept`` fills, in the order :func:`update_values` gives them
UPDATE_COLUMNS = ("edge_id", "seq", "base_version", "received_version", "rank", "alpha", "samples", "modalities",
                  "fingerprint", "weight", "norm")


def update_values(c: Contribution, received_version: int, weight: float, norm: float | None) -> tuple[object, ...]:
    """The row values of an accepted update (both backends store the same fields)."""
    return (c.edge_id, c.seq, c.base_version, received_version, c.rank, float(c.alpha), c.samples,
            json.dumps(c.modalities, sort_keys=True), c.fingerprint, float(weight), norm)


#: what ``_load_updates`` selects before the tensors, in this order
LOAD_COLUMNS = "id, edge_id, seq, base_version, received_version, rank, alpha, samples, modalities, fingerprint, weight"


def pending_from_row(r: Sequence[object], tensors: dict[str, np.ndarray]) -> PendingUpdate:
    """A row selected as ``LOAD_COLUMNS`` plus its tensors, back as a :class:`PendingUpdate`."""
    c = Contribution(
        edge_id=str(r[1]), seq=int(r[2]), base_version=int(r[3]),  # type: ignore[call-overload]
        rank=int(r[5]), alpha=float(r[6]), samples=int(r[7]),  # type: ignore[call-overload, arg-type]
        modalities=json.loads(str(r[8])), fingerprint=str(r[9]), tensors=tensors,
    )
    return PendingUpdate(id=int(r[0]), contribution=c, weight=float(r[10]),  # type: ignore[call-overload, arg-type]
                         received_version=int(r[4]))  # type: ignore[call-overload]


def steps_json(steps: dict[str, float] | None) -> str | None:
    return None if steps is None else json.dumps(steps, sort_keys=True)


def chunks(xs: Sequence[int], n: int) -> Iterable[Sequence[int]]:
    for i in range(0, len(xs), n):
        yield xs[i : i + n]
