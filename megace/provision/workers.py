"""Identities for an edge's inference workers: their own broker credentials, their own signing key, and a
grant from the edge's key that lets its devices accept their predictions.

Why a grant and not the edge's key: the edge's key also signs its uploads to the cloud and every model and
config its devices install; a worker that held it could forge all of those. Why not a list of worker keys
on each device: devices are many and out of reach, while workers come and go with load. So the device
keeps trusting one key per site (its edge's) and the edge's key vouches, once, for each worker's key --
for that site, for predictions and errors sent under that worker's name, until an expiry
(:meth:`broker.signing.Signer.grant`, checked by :class:`broker.signing.Verifier`).

Files per worker (``identities/megace-infer-<edge_id>-w<n>/``, beside the usual ``client.crt``,
``client.key``, ``password``, ``ca.crt``): ``signing.ed25519[.pub]`` (its key) and ``grant.msgpack`` (the
edge's grant for it). The edge agent finds them through its config's ``worker_identities`` (the folder
holding these folders).
"""

from __future__ import annotations

import time
from pathlib import Path

from broker.signing import DelegatedSigner, Signer, load_private_key
from megace.provision import pki
from megace.provision.identity import INFER_KINDS, Identity, Role
from megace.provision.store import Store

GRANT_FILE = "grant.msgpack"
SIGNING_FILE = "signing.ed25519"
DEFAULT_GRANT_DAYS = 365
"""A grant outlives a worker's revocation by at most this long; the broker refuses a revoked worker's
connection at once (CRL, password and ACL files), so the grant only matters against a broker that is itself
compromised. Rotating the edge's key ends every grant it made."""


def worker_id(edge_id: str, n: int) -> str:
    """Worker ``n`` of an edge: ``<edge_id>-w<n>`` (the id ``WorkerProcesses`` gives the worker it spawns)."""
    return f"{edge_id}-w{n}"


def worker_identity(site: str, edge_id: str, n: int) -> Identity:
    return Identity(Role.INFER, worker_id(edge_id, n), site)


def issue_workers(store: Store, site: str, edge_id: str, count: int, *, cert: bool = True, password: bool = True,
                  days: int = DEFAULT_GRANT_DAYS) -> list[Path]:
    """Issue (or rotate) workers 1..``count`` of edge ``edge_id``; returns their folders.

    The edge must be an active identity of ``site`` with a signing key in this folder (``megace provision
    edge``): its key signs the grants."""
    if count < 1 or days < 1:
        raise ValueError("count and days must be at least 1")
    edge = Identity(Role.EDGE, edge_id, site)
    entry = store.entries.get(edge.username)
    if entry is None or entry.revoked or entry.identity != edge:
        raise ValueError(f"no active {edge} in {store.root}: issue the edge first")
    edge_key = store.identity_dir(edge.username) / SIGNING_FILE
    if not edge_key.exists():
        raise ValueError(f"{edge} has no signing key ({edge_key}): issue it with --signing-key")
    issuer = Signer(load_private_key(edge_key))
    expires = int(time.time()) + days * 86_400
    folders = []
    for n in range(1, count + 1):
        ident = worker_identity(site, edge_id, n)
        folder = store.add(ident, cert=cert, password=password, signing_key=True)
        key = load_private_key(folder / SIGNING_FILE)
        grant = issuer.grant(key.public_key(), name=ident.name, site=site, kinds=INFER_KINDS, expires=expires)
        DelegatedSigner(key, grant)  # the pair is consistent before it is written
        pki.write_private(folder / GRANT_FILE, grant)
        folders.append(folder)
    return folders
