"""Who may send the cloud an adapter: each edge's public key, bound to that edge's id and site.

The broker's ACL already keeps an edge on its own site's upload topic; the binding here is what a
stolen or misconfigured edge cannot get around: an upload verifies only under the key provisioned
for the edge it claims to be, on the site that edge belongs to. The cloud's own key signs every
global and site feedback it publishes (edges pin its public key).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker import topics
from broker.signing import (
    BadSignatureError,
    SignatureError,
    Signer,
    UnknownKeyError,
    UnsignedError,
    Verifier,
    is_signed,
    key_id,
    load_public_key,
    raw_public,
    unsigned,
    unwrap,
)
from broker.wire import decode_envelope
from megace_common.trust import SigningConfigError, load_signer


class ImpersonationError(SignatureError):
    """A valid signature by one edge's key on an upload that claims another edge or another site."""


class CloudSigningError(SigningConfigError):
    """A configured key is missing or unreadable, or an edge binding is incomplete (raised at start)."""


@dataclass(frozen=True)
class CloudSigningConfig:
    """The ``[signing]`` section of the cloud config (``megace provision`` writes the files)."""

    key_file: str = ""
    """The cloud's Ed25519 private key (PEM): signs globals and site feedback. Empty: unsigned."""
    edges: dict[str, dict[str, str]] = field(default_factory=dict)
    """``edge_id -> {"site": ..., "key": <public key PEM>}``: who may upload, and for which site."""
    require: bool = False
    """Refuse unsigned uploads (on as soon as any edge key is configured)."""

    def signer(self) -> Signer | None:
        return load_signer(self.key_file)

    def upload_opener(self) -> UploadOpener | None:
        if not self.edges and not self.require:
            return None
        return UploadOpener(self.edges, required=True)


@dataclass(frozen=True)
class _Binding:
    edge: str
    site: str
    verifier: Verifier


class UploadOpener:
    """The cloud inbox's opener: verifies uploads against the edge bindings; other channels pass."""

    def __init__(self, edges: dict[str, dict[str, Any]], *, required: bool = True) -> None:
        self.required = required
        self._by_kid: dict[str, _Binding] = {}
        for edge, entry in edges.items():
            try:
                site, path = topics.check_id(str(entry["site"]), "site"), Path(str(entry["key"]))
                key = load_public_key(path)
            except (KeyError, TypeError, OSError, ValueError) as exc:
                raise CloudSigningError(f"signing.edges.{edge}: needs site and a readable key ({exc})") from None
            self._by_kid[key_id(raw_public(key))] = _Binding(edge, site, Verifier([key]))

    def __call__(self, parsed: topics.Parsed, payload: bytes) -> bytes:
        if parsed.channel is not topics.Channel.ADAPTER_UP:
            return unsigned(payload)
        if not is_signed(payload):
            if self.required:
                raise UnsignedError("an unsigned upload; this cloud takes signed uploads only")
            return payload
        kid = unwrap(payload)[0]
        binding = self._by_kid.get(kid)
        if binding is None:
            raise UnknownKeyError(f"upload signed with key {kid!r}, which no provisioned edge holds")
        try:
            envelope = binding.verifier.open(payload)
        except BadSignatureError:
            raise BadSignatureError(f"upload signature by edge {binding.edge!r} does not verify") from None
        if parsed.site != binding.site:
            raise ImpersonationError(f"edge {binding.edge!r} belongs to site {binding.site!r}, "
                                     f"not {parsed.site!r}")
        env = decode_envelope(envelope)
        body_edge = env.body.get("edge") if isinstance(env.body, dict) else None
        if env.sender != binding.edge or body_edge != binding.edge:
            raise ImpersonationError(f"signed by edge {binding.edge!r}, claims to be {env.sender!r}/{body_edge!r}")
        return envelope
