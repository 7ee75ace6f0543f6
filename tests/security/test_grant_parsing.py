"""Malformed grants and signed messages, one wrong field at a time: each is a typed error and nothing opens.

Network-free. Every input is built here with msgpack and real Ed25519 keys, never through
``broker.signing``; the expected error texts are the ones this file writes down. Where it can, an input
carries valid signatures, so a check that stopped firing would let the message *open* (not merely fail later
with another error).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from broker.signing import (
    BadSignatureError,
    DelegatedSigner,
    DelegationError,
    Grant,
    SignatureError,
    UnknownKeyError,
    UnsignedError,
    Verifier,
    is_signed,
    load_private_key,
    load_public_key,
    unwrap,
)
from broker.wire import Kind, Prediction, encode_envelope

EDGE = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
WORKER = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
OTHER = Ed25519PrivateKey.from_private_bytes(bytes(range(2, 34)))
EXP = 2_000_000_000
SM, DG = b"megace-sm-v1\0", b"megace-dg-v1\0"
GRANT_MAP = "a grant is a map with exactly the keys dg=1, kid, sig, b"
GRANT_FIELDS = "a grant needs kid (str), sig (64 bytes) and b (bytes)"
BODY_KEYS = "a grant body has exactly the keys ['exp', 'kinds', 'name', 'pub', 'site']"
BODY_FIELDS = "a grant body needs pub (32 bytes), name, site, kinds (str) and exp (int)"
MESSAGE_MAP = "a signed message is a map with exactly the keys sm=1, kid, sig, e (and dg, delegated)"
MESSAGE_FIELDS = "a signed message needs kid (str), sig (64 bytes) and e (bytes)"


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def kid(key: Ed25519PrivateKey) -> str:
    return hashlib.sha256(raw(key)).hexdigest()[:16]


def garbage_name(data: bytes) -> str:
    """The exception msgpack itself raises on ``data`` (what a 'not a ...' refusal names)."""
    try:
        msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:
        return type(exc).__name__
    raise AssertionError(f"{data!r} unpacks")


def body(**change: Any) -> dict:
    """A well-formed grant body for WORKER; ``change`` overrides fields."""
    b: dict = {"pub": raw(WORKER), "name": "e0-w1", "site": "site-0", "kinds": ["error", "prediction"], "exp": EXP}
    b.update(change)
    return b


def grant_map(b: Any = None, issuer: Ed25519PrivateKey = EDGE) -> dict:
    """A grant map whose ``sig`` really is ``issuer``'s over ``b`` (packed unless already bytes)."""
    data = b if isinstance(b, bytes) else pack(body() if b is None else b)
    return {"dg": 1, "kid": kid(issuer), "sig": issuer.sign(DG + data), "b": data}


def envelope(sender: str = "e0-w1", kind: Kind = Kind.PREDICTION) -> bytes:
    pred = Prediction("d1", 7, 1, np.array([0.25, 0.75], np.float32), 3).to_body()
    return encode_envelope(kind, sender, 5, pred if kind is Kind.PREDICTION else {"x": 1}, ts_ms=1)


def delegated(grant: bytes | Any, env: bytes | None = None, key: Ed25519PrivateKey = WORKER) -> bytes:
    """A delegated message whose own signature by ``key`` is valid."""
    env = envelope() if env is None else env
    return pack({"sm": 1, "kid": kid(key), "sig": key.sign(SM + env), "e": env, "dg": grant})


def signed(env: bytes, key: Ed25519PrivateKey = EDGE, **change: Any) -> bytes:
    """A plain signed message, valid unless ``change`` alters a field."""
    m: dict = {"sm": 1, "kid": kid(key), "sig": key.sign(SM + env), "e": env}
    m.update(change)
    return pack(m)


def reorder(d: dict, *first: str) -> dict:
    return {**{k: d[k] for k in first}, **{k: v for k, v in d.items() if k not in first}}


def raises_exactly(kind: type[Exception], text: str, fn: Callable[[], Any]) -> None:
    """``fn`` raises ``kind`` itself (not a subclass: the class tells the receiver's counter why) with ``text``."""
    with pytest.raises(kind) as info:
        fn()
    assert type(info.value) is kind and str(info.value) == text


def trusting_edge() -> Verifier:
    return Verifier([EDGE.public_key()])


def test_the_well_formed_inputs_of_this_file_open() -> None:
    """The baseline every malformed case below departs from by one field."""
    assert trusting_edge().open(delegated(pack(grant_map()))) == envelope()
    assert trusting_edge().open(signed(envelope("e0"))) == envelope("e0")


def _grant_shapes() -> list[tuple[str, Any]]:
    good = grant_map()
    return [
        ("dg=2", {**good, "dg": 2}),
        ("dg=True", {**good, "dg": True}),
        ("dg=1.0", {**good, "dg": 1.0}),
        ("keys reordered", reorder(good, "kid")),
        ("an extra key", {**good, "x": 1}),
        ("no b", {k: v for k, v in good.items() if k != "b"}),
        ("an int key", {**good, 7: 1}),
        ("a list of the key names", ["dg", "kid", "sig", "b"]),
    ]


def _grant_fields() -> list[tuple[str, Any]]:
    good = grant_map()
    return [
        ("kid an int", {**good, "kid": 123}),
        ("kid bytes", {**good, "kid": kid(EDGE).encode()}),
        ("sig of 63 bytes", {**good, "sig": good["sig"][:63]}),
        ("sig of 65 bytes", {**good, "sig": good["sig"] + b"\0"}),
        ("sig a str of 64", {**good, "sig": "s" * 64}),
        ("b unpacked", {**good, "b": body()}),
        ("b a str", {**good, "b": "body"}),
    ]


def _body_keys() -> list[tuple[str, Any]]:
    return [
        ("an extra key", grant_map(body(admin=True))),
        ("no exp", grant_map({k: v for k, v in body().items() if k != "exp"})),
        ("a list of the key names", grant_map(["pub", "name", "site", "kinds", "exp"])),
    ]


def _body_fields() -> list[tuple[str, Any]]:
    return [(name, grant_map(body(**change))) for name, change in (
        ("pub of 31 bytes", {"pub": raw(WORKER)[:31]}),
        ("pub of 33 bytes", {"pub": raw(WORKER) + b"\0"}),
        ("pub a str of 32", {"pub": "p" * 32}),
        ("name an int", {"name": 1}),
        ("name nil", {"name": None}),
        ("site an int", {"site": 0}),
        ("exp a float", {"exp": float(EXP)}),
        ("exp True", {"exp": True}),
        ("exp a str", {"exp": str(EXP)}),
        ("kinds a str", {"kinds": "prediction"}),
        ("kinds a map", {"kinds": {"prediction": 1}}),
        ("kinds holding an int", {"kinds": ["prediction", 5]}),
    )]


@pytest.mark.parametrize(("text", "grant_obj"), [
    pytest.param(text, obj, id=f"{part}: {name}")
    for part, text, cases in (("grant", GRANT_MAP, _grant_shapes()), ("grant", GRANT_FIELDS, _grant_fields()),
                              ("body", BODY_KEYS, _body_keys()), ("body", BODY_FIELDS, _body_fields()))
    for name, obj in cases
])
def test_a_malformed_grant_is_a_delegation_error_and_opens_nothing(text: str, grant_obj: Any) -> None:
    grant = pack(grant_obj)
    raises_exactly(DelegationError, text, lambda: Grant(grant))
    verifier = trusting_edge()
    # the edge really signed the body and the worker really signed the envelope: only the shape is wrong
    raises_exactly(DelegationError, text, lambda: verifier.open(delegated(grant)))
    assert verifier.open(delegated(pack(grant_map()))) == envelope()  # the refusal left the verifier usable


def test_a_grant_or_its_body_that_is_not_msgpack_is_a_delegation_error_naming_the_part() -> None:
    for data in (b"\xc1", b"\x84\xa2dg"):
        grant = pack(grant_map(data))  # the edge really signed the garbage body
        raises_exactly(DelegationError, f"not a grant: {garbage_name(data)}", lambda data=data: Grant(data))
        raises_exactly(DelegationError, f"not a grant body: {garbage_name(data)}", lambda grant=grant: Grant(grant))
        raises_exactly(DelegationError, f"not a grant body: {garbage_name(data)}",
                       lambda grant=grant: trusting_edge().open(delegated(grant)))


def _message_shapes() -> list[tuple[str, Callable[[bytes], bytes]]]:
    def plain(**change: Any) -> Callable[[bytes], bytes]:
        return lambda env: signed(env, **change)

    def edit(fn: Callable[[dict], Any]) -> Callable[[bytes], bytes]:
        return lambda env: pack(fn(msgpack.unpackb(signed(env), raw=False)))

    def delegated_edit(fn: Callable[[dict], Any]) -> Callable[[bytes], bytes]:
        return lambda env: pack(fn(msgpack.unpackb(delegated(pack(grant_map()), env), raw=False)))

    return [
        ("sm=2", plain(sm=2)),
        ("sm=True", plain(sm=True)),
        ("sm=1.0", plain(sm=1.0)),
        ("keys reordered", edit(lambda m: reorder(m, "e"))),
        ("an extra key", plain(x=1)),
        ("an int key", edit(lambda m: {**m, 9: 0})),
        ("delegated, dg first", delegated_edit(lambda m: reorder(m, "dg"))),
        ("delegated, sm=2", delegated_edit(lambda m: {**m, "sm": 2})),
    ]


@pytest.mark.parametrize("build", [pytest.param(fn, id=name) for name, fn in _message_shapes()])
def test_a_signed_message_of_the_wrong_shape_is_refused_though_its_signature_holds(
        build: Callable[[bytes], bytes]) -> None:
    payload = build(envelope())
    assert is_signed(payload)
    raises_exactly(SignatureError, MESSAGE_MAP, lambda: trusting_edge().open(payload))
    raises_exactly(SignatureError, MESSAGE_MAP, lambda: unwrap(payload))


def test_a_list_of_the_key_names_is_not_a_signed_message() -> None:
    raises_exactly(SignatureError, MESSAGE_MAP, lambda: unwrap(pack(["sm", "kid", "sig", "e"])))


_ENV = envelope("e0")
_SIG = EDGE.sign(SM + _ENV)  # the edge's real signature of _ENV: cut or padded below
DG_BYTES = "a delegated message's dg is bytes"


@pytest.mark.parametrize(("change", "text"), [
    pytest.param({"kid": 123}, MESSAGE_FIELDS, id="kid an int"),
    pytest.param({"kid": kid(EDGE).encode()}, MESSAGE_FIELDS, id="kid bytes"),
    pytest.param({"sig": _SIG[:63]}, MESSAGE_FIELDS, id="sig of 63 bytes"),
    pytest.param({"sig": _SIG + b"\0"}, MESSAGE_FIELDS, id="sig of 65 bytes"),
    pytest.param({"sig": "s" * 64}, MESSAGE_FIELDS, id="sig a str of 64"),
    pytest.param({"e": _ENV.decode("latin-1")}, MESSAGE_FIELDS, id="e a str"),
    pytest.param({"dg": None}, DG_BYTES, id="dg nil"),  # else the edge's own valid message: it must not open
    pytest.param({"dg": "grant"}, DG_BYTES, id="dg a str"),
    pytest.param({"dg": grant_map()}, DG_BYTES, id="dg an unpacked grant"),
])
def test_a_signed_message_field_of_the_wrong_type_or_length_is_refused(change: dict, text: str) -> None:
    payload = signed(_ENV, **change)
    raises_exactly(SignatureError, text, lambda: unwrap(payload))
    raises_exactly(SignatureError, text, lambda: trusting_edge().open(payload))


def test_a_signed_message_that_is_not_msgpack_is_a_plain_signature_error() -> None:
    """Not a DelegationError: nothing about a grant was read yet."""
    for payload in (b"\x84", b"\x85\xc1", b"\x84\xa2sm"):
        text = f"not a signed message: {garbage_name(payload)}"
        raises_exactly(SignatureError, text, lambda payload=payload: trusting_edge().open(payload))
        raises_exactly(SignatureError, text, lambda payload=payload: unwrap(payload))


def test_one_and_zero_byte_payloads_sit_on_the_right_side_of_is_signed() -> None:
    assert is_signed(b"\x84") and is_signed(b"\x85") and not is_signed(b"\x87") and not is_signed(b"")
    optional = Verifier([EDGE.public_key()], required=False)
    assert optional.open(b"") == b"" and optional.open(b"\x87") == b"\x87"
    # a truncated signed message does not pass as an unsigned one during a migration
    truncated = b"\x84"
    raises_exactly(SignatureError, f"not a signed message: {garbage_name(truncated)}", lambda: optional.open(truncated))
    for payload in (b"", b"\x87"):
        raises_exactly(UnsignedError, "an unsigned message where a signature is required",
                       lambda payload=payload: trusting_edge().open(payload))


def test_unwrap_gives_three_fields_for_plain_and_delegated_messages() -> None:
    env, grant = envelope(), pack(grant_map())
    assert unwrap(signed(env)) == (kid(EDGE), EDGE.sign(SM + env), env)
    assert unwrap(delegated(grant, env)) == (kid(WORKER), WORKER.sign(SM + env), env)


def test_refusals_of_keys_and_signatures_name_the_key() -> None:
    env = envelope("e0")
    raises_exactly(UnknownKeyError, f"signed with key {kid(OTHER)!r}, which this receiver does not trust",
                   lambda: trusting_edge().open(signed(env, OTHER)))
    raises_exactly(BadSignatureError, f"signature by key {kid(EDGE)!r} does not verify",
                   lambda: trusting_edge().open(signed(env, sig=OTHER.sign(SM + env))))
    raises_exactly(UnknownKeyError, f"delegated by key {kid(OTHER)!r}, which this receiver does not trust",
                   lambda: trusting_edge().open(delegated(pack(grant_map(issuer=OTHER)))))
    forged = {**grant_map(), "sig": OTHER.sign(DG + pack(body()))}
    raises_exactly(BadSignatureError, f"grant signature by key {kid(EDGE)!r} does not verify",
                   lambda: trusting_edge().open(delegated(pack(forged))))
    raises_exactly(BadSignatureError, f"signature by key {kid(WORKER)!r} does not verify",
                   lambda: trusting_edge().open(pack({**msgpack.unpackb(delegated(pack(grant_map())), raw=False),
                                                      "sig": WORKER.sign(SM + b"other")})))


def test_a_grant_expires_at_its_exp_second_exactly() -> None:
    payload = delegated(pack(grant_map()))
    for now in (EXP - 1, EXP - 0.001):
        verifier = trusting_edge()
        verifier.clock = lambda now=now: now
        assert verifier.open(payload) == envelope()
    for now in (EXP, EXP + 0.5):
        verifier = trusting_edge()
        verifier.clock = lambda now=now: now
        raises_exactly(DelegationError, f"the grant of 'e0-w1' (site 'site-0') expired at {EXP}",
                       lambda verifier=verifier: verifier.open(payload))


def test_an_envelope_a_worker_signed_must_itself_be_a_map_naming_a_granted_kind() -> None:
    grant = pack(grant_map())
    garbage = b"\xc1"
    raises_exactly(SignatureError, f"not a envelope: {garbage_name(garbage)}",
                   lambda: trusting_edge().open(delegated(grant, garbage)))
    for env in (pack(["prediction", "e0-w1"]), pack(5), pack({"s": "e0-w1"})):
        raises_exactly(DelegationError, "the grant of 'e0-w1' does not cover None messages",
                       lambda env=env: trusting_edge().open(delegated(grant, env)))


def test_a_worker_key_without_its_grant_cannot_build_a_delegated_signer() -> None:
    raises_exactly(ValueError, "the grant names another key than this signer's",
                   lambda: DelegatedSigner(OTHER, pack(grant_map())))


def test_a_key_file_of_another_algorithm_is_refused_naming_the_file(tmp_path: Path) -> None:
    x = X25519PrivateKey.from_private_bytes(bytes(range(32)))
    priv, pub = tmp_path / "x25519.pem", tmp_path / "x25519.pub"
    priv.write_bytes(x.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    pub.write_bytes(x.public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo))
    raises_exactly(ValueError, f"{priv}: not an Ed25519 private key", lambda: load_private_key(priv))
    raises_exactly(ValueError, f"{pub}: not an Ed25519 public key", lambda: load_public_key(pub))


class CountingKey(Ed25519PublicKey):
    """A real trusted key that counts the grant signatures checked with it (the cache's whole point)."""

    def __init__(self, key: Ed25519PublicKey) -> None:
        self.key, self.grant_checks = key, 0

    def verify(self, signature: bytes, data: bytes) -> None:
        self.grant_checks += data.startswith(DG)
        self.key.verify(signature, data)

    def public_bytes(self, encoding: Any, format: Any) -> bytes:
        return self.key.public_bytes(encoding, format)

    def public_bytes_raw(self) -> bytes:
        return self.key.public_bytes_raw()

    def __eq__(self, other: object) -> bool:
        return other is self

    __hash__ = object.__hash__

    def __copy__(self) -> CountingKey:
        return self

    def __deepcopy__(self, memo: dict) -> CountingKey:
        return self


def test_a_grant_is_checked_once_while_cached_and_the_cache_holds_64() -> None:
    edge = CountingKey(EDGE.public_key())
    verifier = Verifier([edge])
    first = delegated(pack(grant_map()))
    for _ in range(3):
        assert verifier.open(first) == envelope()
    assert edge.grant_checks == 1
    # 63 more grants (another expiry each) fill the cache to 64: the first is still remembered
    for n in range(1, 64):
        assert verifier.open(delegated(pack(grant_map(body(exp=EXP + n))))) == envelope()
    assert edge.grant_checks == 64
    verifier.open(first)
    assert edge.grant_checks == 64
    # a 65th does not fit: the cache starts over, so the first grant is checked again
    verifier.open(delegated(pack(grant_map(body(exp=EXP + 64)))))
    verifier.open(first)
    assert edge.grant_checks == 66
