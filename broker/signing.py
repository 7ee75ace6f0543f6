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

``cryptography`` is imported lazily: a device that verifies nothing does not pay for it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack

from broker.errors import WireError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

DOMAIN = b"megace-sm-v1\0"
SIGNED_FIRST_BYTE = 0x84
_KEYS = ("sm", "kid", "sig", "e")


class SignatureError(WireError):
    """A message that must be signed is not, or its signature does not verify."""


class UnsignedError(SignatureError):
    """The message carries no signature where one is required."""


class UnknownKeyError(SignatureError):
    """The message is signed with a key this receiver does not trust."""


class BadSignatureError(SignatureError):
    """The signature does not match the message (forged or altered)."""


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


def is_signed(payload: bytes | bytearray | memoryview) -> bool:
    """Whether ``payload`` has the shape of a signed message (it is not verified)."""
    return len(payload) > 0 and payload[0] == SIGNED_FIRST_BYTE


def unwrap(payload: bytes | bytearray | memoryview) -> tuple[str, bytes, bytes]:
    """``(kid, signature, envelope bytes)`` of a signed message; a malformed one is a :class:`SignatureError`."""
    try:
        obj: Any = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises many unrelated types on garbage
        raise SignatureError(f"not a signed message: {type(exc).__name__}") from None
    if not isinstance(obj, dict) or tuple(obj) != _KEYS or type(obj["sm"]) is not int or obj["sm"] != 1:
        raise SignatureError("a signed message is a map with exactly the keys sm=1, kid, sig, e")
    kid, sig, env = obj["kid"], obj["sig"], obj["e"]
    if not isinstance(kid, str) or not isinstance(sig, bytes) or len(sig) != 64 or not isinstance(env, bytes):
        raise SignatureError("a signed message needs kid (str), sig (64 bytes) and e (bytes)")
    return kid, sig, env


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

    @property
    def kids(self) -> frozenset[str]:
        return frozenset(self._keys)

    def open(self, payload: bytes | bytearray | memoryview) -> bytes:
        """The envelope bytes inside ``payload`` once its signature verifies; otherwise a typed error."""
        if not is_signed(payload):
            if self.required:
                raise UnsignedError("an unsigned message where a signature is required")
            return bytes(payload)
        kid, sig, env = unwrap(payload)
        key = self._keys.get(kid)
        if key is None:
            raise UnknownKeyError(f"signed with key {kid!r}, which this receiver does not trust")
        from cryptography.exceptions import InvalidSignature

        try:
            key.verify(sig, DOMAIN + env)
        except InvalidSignature:
            raise BadSignatureError(f"signature by key {kid!r} does not verify") from None
        return env
