"""Signed messages: the exact bytes of the spec, and every way a forgery is refused."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.signing import (
    BadSignatureError,
    SignatureError,
    Signer,
    UnknownKeyError,
    UnsignedError,
    Verifier,
    is_signed,
    load_private_key,
    load_public_key,
    private_pem,
    public_pem,
)
from broker.wire import Kind, decode_envelope, encode_envelope

SEED = bytes(range(32))


def _key(seed: bytes = SEED) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(seed)


def _raw_pub(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def test_a_signed_message_has_the_byte_layout_of_the_spec() -> None:
    key = _key()
    env = encode_envelope(Kind.GLOBAL, "cloud", 7, {"x": 1}, ts_ms=1)
    kid = hashlib.sha256(_raw_pub(key)).hexdigest()[:16]
    sig = key.sign(b"megace-sm-v1\0" + env)  # Ed25519 is deterministic: the same bytes every time
    assert len(env) < 256
    expected = (b"\x84" + b"\xa2sm\x01" + b"\xa3kid\xb0" + kid.encode() + b"\xa3sig\xc4\x40" + sig
                + b"\xa1e\xc4" + bytes([len(env)]) + env)
    signed = Signer(key).sign(env)
    assert signed == expected
    assert is_signed(signed) and not is_signed(env)
    assert Signer(key).kid == kid


def test_the_verifier_returns_the_envelope_unchanged() -> None:
    key = _key()
    env = encode_envelope(Kind.SITE_FEEDBACK, "cloud", 3, {"site": "s1"}, ts_ms=5)
    out = Verifier([key.public_key()]).open(Signer(key).sign(env))
    assert out == env
    assert decode_envelope(out).seq == 3


@pytest.mark.parametrize("where", ["envelope", "signature"])
def test_one_flipped_bit_anywhere_is_a_bad_signature(where: str) -> None:
    key = _key()
    env = encode_envelope(Kind.GLOBAL, "cloud", 1, {"v": 1}, ts_ms=1)
    signed = bytearray(Signer(key).sign(env))
    # the signature sits before the envelope; flip a bit inside the chosen field
    pos = len(signed) - 3 if where == "envelope" else signed.index(b"\xc4\x40") + 2 + 10
    signed[pos] ^= 0x01
    with pytest.raises(BadSignatureError):
        Verifier([key.public_key()]).open(bytes(signed))


def test_a_signature_without_the_domain_tag_does_not_verify() -> None:
    key = _key()
    env = encode_envelope(Kind.GLOBAL, "cloud", 1, {}, ts_ms=1)
    good = Signer(key).sign(env)
    forged = good.replace(key.sign(b"megace-sm-v1\0" + env), key.sign(env))
    assert forged != good
    with pytest.raises(BadSignatureError):
        Verifier([key.public_key()]).open(forged)


def test_another_key_is_unknown_and_an_unsigned_message_is_refused_unless_optional() -> None:
    trusted, attacker = _key(), _key(bytes(32))
    env = encode_envelope(Kind.GLOBAL, "cloud", 1, {}, ts_ms=1)
    verifier = Verifier([trusted.public_key()])
    with pytest.raises(UnknownKeyError):
        verifier.open(Signer(attacker).sign(env))
    with pytest.raises(UnsignedError):
        verifier.open(env)
    assert Verifier([trusted.public_key()], required=False).open(env) == env


def test_during_a_rotation_both_keys_verify() -> None:
    old, new = _key(), _key(b"\x01" * 32)
    env = encode_envelope(Kind.GLOBAL, "cloud", 1, {}, ts_ms=1)
    verifier = Verifier([old.public_key(), new.public_key()])
    assert verifier.open(Signer(old).sign(env)) == env
    assert verifier.open(Signer(new).sign(env)) == env
    assert len(verifier.kids) == 2


@pytest.mark.parametrize("payload", [
    b"\x84",  # truncated
    b"\x84\xa2sm\x02\xa3kid\xa1a\xa3sig\xc4\x40" + bytes(64) + b"\xa1e\xc4\x00",  # sm != 1
    b"\x84\xa2sm\x01\xa3kid\xa1a\xa3sig\xc4\x03abc\xa1e\xc4\x00",  # short signature
    b"\x84\xa2sm\x01\xa3kid\x01\xa3sig\xc4\x40" + bytes(64) + b"\xa1e\xc4\x00",  # kid not a string
    b"\x84\xa1e\xc4\x00\xa3kid\xa1a\xa3sig\xc4\x40" + bytes(64) + b"\xa2sm\x01",  # keys out of order
])
def test_malformed_signed_messages_are_signature_errors(payload: bytes) -> None:
    with pytest.raises(SignatureError):
        Verifier([_key().public_key()]).open(payload)


def test_keys_round_trip_through_pem_files(tmp_path) -> None:
    key = _key()
    (tmp_path / "k.pem").write_bytes(private_pem(key))
    (tmp_path / "k.pub").write_bytes(public_pem(key.public_key()))
    loaded, pub = load_private_key(tmp_path / "k.pem"), load_public_key(tmp_path / "k.pub")
    env = encode_envelope(Kind.GLOBAL, "cloud", 1, {}, ts_ms=1)
    assert Verifier([pub]).open(Signer(loaded).sign(env)) == env
    with pytest.raises(ValueError):
        load_private_key(tmp_path / "k.pub")
