"""Signed messages: Ed25519 over the exact bytes of an envelope, so no verifier has to re-encode anything.

A signed message is a msgpack map with exactly four keys, in this order::

    {"sm": 1, "kid": <key id, str>, "sig": <64-byte Ed25519 signature, bin>, "e": <envelope bytes, bin>}

``sig`` signs the domain tag ``b"megace-sm-v1\\0"`` followed by ``e``: the tag keeps a signature made
for megace from being valid for any other protocol that signs the same key's messages. ``kid`` is
the first 16 hex digits of SHA-256 over the raw 32-byte public key, so a verifier can hold several
keys during a rotation. A signed message starts with the byte ``0x84`` (a map of four), an
envelope with ``0x87`` (a map of seven), so a receiver can tell them apart from the first byte.

What a signature proves is who produced the envelope; freshness (seq, model version) is still
checked by the receiver against what it has seen. Chunked transfers sign the whole message: the
receiver verifies after reassembly.

Delegation (an edge's inference workers): a receiver trusts one key per sender it knows (a device, its
edge's), yet a site's predictions may come from workers that must not hold that key (it also signs the
edge's uploads and models). So the trusted key signs a *grant* for a worker's own key, and the worker's
messages carry it: a map of five, ``{"sm": 1, "kid", "sig", "e", "dg": <grant bytes>}`` (first byte
``0x85``), where ``dg`` is ``{"dg": 1, "kid": <issuer's kid>, "sig": <Ed25519 by the issuer over
b"megace-dg-v1\0" + b>, "b": <grant body>}`` and the body is ``{"pub": <the worker's raw public key>,
"name": <the envelope sender it may use>, "site": str, "kinds": [envelope kinds], "exp": <unix seconds>}``.
A receiver accepts it only when the issuer is a key it trusts, the grant has not expired, ``kid`` is the
granted key's, the signature verifies with it, and the envelope's kind and sender are the granted ones
(:class:`DelegationError` otherwise). This is a one-level certificate chain (no grant of a grant): the
receiver's trust stays one key per site, and a worker can sign nothing but what its grant names.

``cryptography`` is imported lazily: a device that verifies nothing does not pay for it.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack

from broker.errors import WireError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

DOMAIN = b"megace-sm-v1\0"
GRANT_DOMAIN = b"megace-dg-v1\0"
"""Domain tag of a grant's signature: a grant can never pass for a signed message, nor the reverse."""
SIGNED_FIRST_BYTE = 0x84
DELEGATED_FIRST_BYTE = 0x85
_KEYS = ("sm", "kid", "sig", "e")
_DELEGATED_KEYS = (*_KEYS, "dg")
_GRANT_KEYS = ("dg", "kid", "sig", "b")
_BODY_KEYS = frozenset({"pub", "name", "site", "kinds", "exp"})
_CACHE = 64
"""Verified grants a :class:`Verifier` remembers (a site has a handful of workers)."""


class SignatureError(WireError):
    """A message that must be signed is not, or its signature does not verify."""


class UnsignedError(SignatureError):
    """The message carries no signature where one is required."""


class UnknownKeyError(SignatureError):
    """The message is signed with a key this receiver does not trust."""


class BadSignatureError(SignatureError):
    """The signature does not match the message (forged or altered)."""


class DelegationError(SignatureError):
    """A delegated signature whose grant does not cover the message: malformed, expired, another key than the
    one granted, or an envelope kind or sender the grant does not name."""


def key_id(public_raw: bytes) -> str:
    """The id a signed message names its key by: 16 hex digits of SHA-256 over the raw public key."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


def raw_public(key: Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of a public key (what :func:`key_id` hashes)."""
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def generate_private_key() -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate()


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM (PKCS#8) file; anything else is a ``ValueError``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM (SubjectPublicKeyInfo) file."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    key = serialization.load_pem_public_key(Path(path).read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: not an Ed25519 public key")
    return key


def private_pem(key: Ed25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def public_pem(key: Ed25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


class Signer:
    """Wraps envelopes into signed messages with one private key.

    Args:
        key: The sender's Ed25519 private key (see :func:`load_private_key`).
    """

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public_key = key.public_key()
        self.kid = key_id(raw_public(self.public_key))

    def sign(self, envelope: bytes) -> bytes:
        """The signed message carrying ``envelope`` unchanged."""
        sig = self._key.sign(DOMAIN + bytes(envelope))
        return msgpack.packb({"sm": 1, "kid": self.kid, "sig": sig, "e": bytes(envelope)}, use_bin_type=True)

    def grant(self, key: Ed25519PublicKey, *, name: str, site: str, kinds: Iterable[str], expires: int) -> bytes:
        """A grant letting ``key`` sign envelopes of ``kinds`` sent as ``name`` until ``expires`` (unix s)."""
        body = msgpack.packb({"pub": raw_public(key), "name": name, "site": site, "kinds": sorted(set(kinds)),
                              "exp": int(expires)}, use_bin_type=True)
        sig = self._key.sign(GRANT_DOMAIN + body)
        return msgpack.packb({"dg": 1, "kid": self.kid, "sig": sig, "b": body}, use_bin_type=True)


class Grant:
    """A parsed grant (not verified by parsing: :class:`Verifier` checks the issuer's signature)."""

    __slots__ = ("body", "exp", "issuer", "kinds", "name", "pub", "sig", "site")

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        obj = _unpack(data, "grant")
        if not isinstance(obj, dict) or tuple(obj) != _GRANT_KEYS or type(obj["dg"]) is not int or obj["dg"] != 1:
            raise DelegationError("a grant is a map with exactly the keys dg=1, kid, sig, b")
        issuer, sig, body = obj["kid"], obj["sig"], obj["b"]
        if not isinstance(issuer, str) or not isinstance(sig, bytes) or len(sig) != 64 or not isinstance(body, bytes):
            raise DelegationError("a grant needs kid (str), sig (64 bytes) and b (bytes)")
        b = _unpack(body, "grant body")
        if not isinstance(b, dict) or set(b) != _BODY_KEYS:
            raise DelegationError(f"a grant body has exactly the keys {sorted(_BODY_KEYS)}")
        pub, kinds = b["pub"], b["kinds"]
        if (not isinstance(pub, bytes) or len(pub) != 32 or not isinstance(b["name"], str)
                or not isinstance(b["site"], str) or type(b["exp"]) is not int or not isinstance(kinds, list)
                or not all(isinstance(k, str) for k in kinds)):
            raise DelegationError("a grant body needs pub (32 bytes), name, site, kinds (str) and exp (int)")
        self.issuer, self.sig, self.body = issuer, sig, body
        self.pub, self.name, self.site = pub, b["name"], b["site"]
        self.kinds, self.exp = frozenset(kinds), b["exp"]

    @property
    def kid(self) -> str:
        """The key id of the granted key (what the delegated messages name)."""
        return key_id(self.pub)


class DelegatedSigner(Signer):
    """Signs with its own key and attaches the grant that lets the receivers' trusted key vouch for it.

    Args:
        key: This signer's private key (the one the grant names).
        grant: The grant bytes (:meth:`Signer.grant`, written by ``megace provision workers``).
    """

    def __init__(self, key: Ed25519PrivateKey, grant: bytes) -> None:
        super().__init__(key)
        parsed = Grant(grant)
        if parsed.kid != self.kid:
            raise ValueError("the grant names another key than this signer's")
        self.grant_info = parsed
        self._grant = bytes(grant)

    def sign(self, envelope: bytes) -> bytes:
        sig = self._key.sign(DOMAIN + bytes(envelope))
        return msgpack.packb({"sm": 1, "kid": self.kid, "sig": sig, "e": bytes(envelope), "dg": self._grant},
                             use_bin_type=True)


def _unpack(data: bytes | bytearray | memoryview, what: str) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises many unrelated types on garbage
        raise (DelegationError if what.startswith("grant") else SignatureError)(
            f"not a {what}: {type(exc).__name__}") from None


def is_signed(payload: bytes | bytearray | memoryview) -> bool:
    """Whether ``payload`` has the shape of a signed message, delegated or not (it is not verified)."""
    return len(payload) > 0 and payload[0] in (SIGNED_FIRST_BYTE, DELEGATED_FIRST_BYTE)


def _parse(payload: bytes | bytearray | memoryview) -> tuple[str, bytes, bytes, bytes | None]:
    """``(kid, signature, envelope, grant or None)``; a malformed message is a :class:`SignatureError`."""
    obj = _unpack(payload, "signed message")
    if (not isinstance(obj, dict) or tuple(obj) not in (_KEYS, _DELEGATED_KEYS) or type(obj["sm"]) is not int
            or obj["sm"] != 1):
        raise SignatureError("a signed message is a map with exactly the keys sm=1, kid, sig, e (and dg, delegated)")
    kid, sig, env, grant = obj["kid"], obj["sig"], obj["e"], obj.get("dg")
    if not isinstance(kid, str) or not isinstance(sig, bytes) or len(sig) != 64 or not isinstance(env, bytes):
        raise SignatureError("a signed message needs kid (str), sig (64 bytes) and e (bytes)")
    if "dg" in obj and not isinstance(grant, bytes):
        raise SignatureError("a delegated message's dg is bytes")
    return kid, sig, env, grant


def unwrap(payload: bytes | bytearray | memoryview) -> tuple[str, bytes, bytes]:
    """``(kid, signature, envelope bytes)`` of a signed message (for a delegated one, ``kid`` is the
    delegate's); a malformed one is a :class:`SignatureError`."""
    return _parse(payload)[:3]


def unsigned(payload: bytes) -> bytes:
    """The envelope bytes of ``payload``, taking a signed message's envelope without verifying it.

    For receivers that were given no key: they still understand a signing sender. Anything that
    can change a model or a prediction must be opened with a :class:`Verifier` instead.
    """
    if is_signed(payload):
        return unwrap(payload)[2]
    return payload


class Verifier:
    """Opens signed messages from the senders it trusts.

    Args:
        keys: The trusted public keys; each is known by its :func:`key_id`. Several keys may be
            trusted at once (a rotation in progress).
        required: When True (the default) an unsigned payload is refused with :class:`UnsignedError`;
            when False it passes through unchanged (a migration period, counted by the caller).
    """

    def __init__(self, keys: Iterable[Ed25519PublicKey], *, required: bool = True) -> None:
        self._keys: Mapping[str, Ed25519PublicKey] = {key_id(raw_public(k)): k for k in keys}
        self.required = required
        self.clock = time.time
        """Seconds since the epoch, for grant expiry (a test may replace it)."""
        self._grants: dict[bytes, tuple[Grant, Ed25519PublicKey]] = {}
        """Grants already verified (a worker attaches the same one to every message), at most :data:`_CACHE`."""

    @property
    def kids(self) -> frozenset[str]:
        return frozenset(self._keys)

    def open(self, payload: bytes | bytearray | memoryview) -> bytes:
        """The envelope bytes inside ``payload`` once its signature verifies; otherwise a typed error."""
        if not is_signed(payload):
            if self.required:
                raise UnsignedError("an unsigned message where a signature is required")
            return bytes(payload)
        kid, sig, env, grant_bytes = _parse(payload)
        grant: Grant | None = None
        if grant_bytes is None:
            key = self._keys.get(kid)
            if key is None:
                raise UnknownKeyError(f"signed with key {kid!r}, which this receiver does not trust")
        else:
            grant, key = self._granted(grant_bytes)
            if grant.kid != kid:
                raise DelegationError(f"signed with key {kid!r}, not the key its grant names ({grant.kid!r})")
            if self.clock() >= grant.exp:
                raise DelegationError(f"the grant of {grant.name!r} (site {grant.site!r}) expired at {grant.exp}")
        from cryptography.exceptions import InvalidSignature

        try:
            key.verify(sig, DOMAIN + env)
        except InvalidSignature:
            raise BadSignatureError(f"signature by key {kid!r} does not verify") from None
        if grant is not None:
            _check_granted(grant, env)
        return env

    def _granted(self, data: bytes) -> tuple[Grant, Ed25519PublicKey]:
        """The grant and its key once the issuer (a trusted key) is known to have signed it."""
        hit = self._grants.get(data)
        if hit is not None:
            return hit
        grant = Grant(data)
        issuer = self._keys.get(grant.issuer)
        if issuer is None:
            raise UnknownKeyError(f"delegated by key {grant.issuer!r}, which this receiver does not trust")
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        try:
            issuer.verify(grant.sig, GRANT_DOMAIN + grant.body)
        except InvalidSignature:
            raise BadSignatureError(f"grant signature by key {grant.issuer!r} does not verify") from None
        if len(self._grants) >= _CACHE:
            self._grants.clear()
        hit = self._grants[data] = (grant, Ed25519PublicKey.from_public_bytes(grant.pub))
        return hit


def _check_granted(grant: Grant, envelope: bytes) -> None:
    """The envelope's kind and sender must be the grant's (read from the verified bytes, not decoded in full)."""
    obj = _unpack(envelope, "envelope")
    kind, sender = (obj.get("k"), obj.get("s")) if isinstance(obj, dict) else (None, None)
    if not isinstance(kind, str) or kind not in grant.kinds:
        raise DelegationError(f"the grant of {grant.name!r} does not cover {kind!r} messages")
    if sender != grant.name:
        raise DelegationError(f"the grant names sender {grant.name!r}, the envelope {sender!r}")
