"""An edge's grant lets its inference worker's own key sign predictions its devices accept; nothing more.

Real keys (Ed25519 through ``cryptography``), real provisioning folders, real files. The expected layout is
built here with msgpack and the raw keys, not with the code under test.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from broker.signing import (
    BadSignatureError,
    DelegatedSigner,
    DelegationError,
    Signer,
    UnknownKeyError,
    Verifier,
    is_signed,
    load_private_key,
    load_public_key,
    unsigned,
    unwrap,
)
from broker.wire import ErrorReport, Kind, Prediction, decode_envelope, encode_envelope
from edge_agent.config import EdgeConfigError
from edge_agent.infer_worker import IDENTITY_PREFIX, worker_login
from megace.cli import app
from megace.provision import Identity, Role
from megace.provision.identity import shared_request
from megace.provision.store import Store
from megace.provision.workers import issue_workers, worker_id
from tests.support.edge_testkit import edge_config

EDGE_SEED, WORKER_SEED, OTHER_SEED = bytes(range(32)), bytes(range(1, 33)), bytes(range(2, 34))
KINDS = ["error", "prediction"]


def raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def kid(key: Ed25519PrivateKey) -> str:
    return hashlib.sha256(raw(key)).hexdigest()[:16]


def prediction(sender: str, seq: int = 5) -> bytes:
    body = Prediction("d1", 7, 1, np.array([0.25, 0.75], np.float32), 3).to_body()
    return encode_envelope(Kind.PREDICTION, sender, seq, body, ts_ms=1)


def setup(expires: int | None = None) -> tuple[Ed25519PrivateKey, Ed25519PrivateKey, bytes]:
    edge, worker = Ed25519PrivateKey.from_private_bytes(EDGE_SEED), Ed25519PrivateKey.from_private_bytes(WORKER_SEED)
    grant = Signer(edge).grant(worker.public_key(), name="e0-w1", site="site-0", kinds=["prediction", "error"],
                               expires=expires or int(time.time()) + 3600)
    return edge, worker, grant


def test_a_delegated_message_has_the_documented_layout_and_opens_with_the_edge_key_alone() -> None:
    edge, worker, grant = setup(expires=2_000_000_000)
    body = msgpack.packb({"pub": raw(worker), "name": "e0-w1", "site": "site-0", "kinds": KINDS,
                          "exp": 2_000_000_000}, use_bin_type=True)
    expected_grant = msgpack.packb({"dg": 1, "kid": kid(edge), "sig": edge.sign(b"megace-dg-v1\0" + body),
                                    "b": body}, use_bin_type=True)
    assert grant == expected_grant  # Ed25519 is deterministic
    env = prediction("e0-w1")
    signed = DelegatedSigner(worker, grant).sign(env)
    expected = msgpack.packb({"sm": 1, "kid": kid(worker), "sig": worker.sign(b"megace-sm-v1\0" + env), "e": env,
                              "dg": expected_grant}, use_bin_type=True)
    assert signed == expected and signed[0] == 0x85 and is_signed(signed)
    assert Verifier([edge.public_key()]).open(signed) == env
    assert unwrap(signed)[0] == kid(worker) and unsigned(signed) == env  # the monitor's and cloud's view
    error = encode_envelope(Kind.ERROR, "e0-w1", 6, ErrorReport("unregistered", "x", 3).to_body())
    assert decode_envelope(Verifier([edge.public_key()]).open(DelegatedSigner(worker, grant).sign(error))).seq == 6


def test_what_a_worker_grant_does_not_cover_is_refused_with_a_typed_error() -> None:
    edge, worker, grant = setup()
    other = Ed25519PrivateKey.from_private_bytes(OTHER_SEED)
    devices_of_edge = Verifier([edge.public_key()])
    signer = DelegatedSigner(worker, grant)
    # another site's edge: its devices trust their own edge's key, not this one
    with pytest.raises(UnknownKeyError):
        Verifier([other.public_key()]).open(signer.sign(prediction("e0-w1")))
    # a model or a config is not a worker's to send, nor may it speak as the edge (or another worker)
    with pytest.raises(DelegationError, match="does not cover 'model'"):
        devices_of_edge.open(signer.sign(encode_envelope(Kind.MODEL, "e0-w1", 1, {"x": 1})))
    with pytest.raises(DelegationError, match="does not cover 'config'"):
        devices_of_edge.open(signer.sign(encode_envelope(Kind.CONFIG, "e0-w1", 1, {"x": 1})))
    for sender in ("e0", "e0-w2"):
        with pytest.raises(DelegationError, match="sender"):
            devices_of_edge.open(signer.sign(prediction(sender)))
    # a stolen grant with the thief's key (kid rewritten to the thief's, then to the granted one)
    env = prediction("e0-w1")
    thief = msgpack.packb({"sm": 1, "kid": kid(other), "sig": other.sign(b"megace-sm-v1\0" + env), "e": env,
                           "dg": grant}, use_bin_type=True)
    with pytest.raises(DelegationError, match="not the key its grant names"):
        devices_of_edge.open(thief)
    posing = msgpack.packb({"sm": 1, "kid": kid(worker), "sig": other.sign(b"megace-sm-v1\0" + env), "e": env,
                            "dg": grant}, use_bin_type=True)
    with pytest.raises(BadSignatureError):
        devices_of_edge.open(posing)
    # a grant altered to name the thief's key: the edge's signature over it no longer holds
    g = msgpack.unpackb(grant, raw=False)
    b = msgpack.unpackb(g["b"], raw=False)
    b["pub"] = raw(other)
    g["b"] = msgpack.packb(b, use_bin_type=True)
    forged = msgpack.packb(g, use_bin_type=True)
    with pytest.raises(BadSignatureError):
        devices_of_edge.open(msgpack.packb({"sm": 1, "kid": kid(other), "sig": other.sign(b"megace-sm-v1\0" + env),
                                            "e": env, "dg": forged}, use_bin_type=True))
    # a message signature by the edge cannot pass for a grant (domain tags differ)
    body = g["b"]
    g2 = {"dg": 1, "kid": kid(edge), "sig": edge.sign(b"megace-sm-v1\0" + body), "b": body}
    with pytest.raises(BadSignatureError):
        devices_of_edge.open(msgpack.packb({"sm": 1, "kid": kid(other), "sig": other.sign(b"megace-sm-v1\0" + env),
                                            "e": env, "dg": msgpack.packb(g2, use_bin_type=True)},
                                           use_bin_type=True))
    # expired
    late = Verifier([edge.public_key()])
    late.clock = lambda: time.time() + 7200
    with pytest.raises(DelegationError, match="expired"):
        late.open(signer.sign(env))
    # malformed grants
    for bad in (b"\xc1", msgpack.packb({"dg": 2, "kid": "x", "sig": b"s" * 64, "b": b""}),
                msgpack.packb([1, 2, 3])):
        with pytest.raises(DelegationError):
            devices_of_edge.open(msgpack.packb({"sm": 1, "kid": kid(worker), "sig": b"s" * 64, "e": env, "dg": bad},
                                               use_bin_type=True))
    with pytest.raises(ValueError, match="another key"):
        DelegatedSigner(other, grant)


def test_provision_workers_writes_identities_grants_and_acl_blocks(tmp_path: Path) -> None:
    runner = CliRunner()
    pki = tmp_path / "pki"
    for args in (["init", str(pki), "--host", "localhost"], ["edge", str(pki), "site-0", "e0"],
                 ["edge", str(pki), "site-1", "e1"], ["device", str(pki), "site-1", "d1"]):
        assert runner.invoke(app, ["provision", *args]).exit_code == 0
    result = runner.invoke(app, ["provision", "workers", str(pki), "site-0", "e0", "--count", "2"])
    assert result.exit_code == 0, result.output
    store = Store.open(pki)
    edge_pub = load_public_key(store.identity_dir("megace-edge-e0") / "signing.ed25519.pub")
    other_edge_pub = load_public_key(store.identity_dir("megace-edge-e1") / "signing.ed25519.pub")
    for n in (1, 2):
        folder = store.identity_dir(f"megace-infer-e0-w{n}")
        for name in ("client.crt", "client.key", "password", "signing.ed25519", "grant.msgpack", "ca.crt"):
            assert (folder / name).exists(), name
        for secret in ("client.key", "password", "signing.ed25519", "grant.msgpack"):
            assert os.stat(folder / secret).st_mode & 0o077 == 0, secret
        signer = DelegatedSigner(load_private_key(folder / "signing.ed25519"), (folder / "grant.msgpack").read_bytes())
        env = prediction(f"e0-w{n}")
        assert Verifier([edge_pub]).open(signer.sign(env)) == env
        with pytest.raises(UnknownKeyError):
            Verifier([other_edge_pub]).open(signer.sign(env))
        assert signer.grant_info.site == "site-0" and signer.grant_info.kinds == {"prediction", "error"}
        assert 364 * 86400 < signer.grant_info.exp - time.time() <= 365 * 86400
    acl = (pki / "broker" / "megace.acl").read_text()
    block = acl.split("# infer e0-w1 (site site-0)\n", 1)[1].split("\n\n", 1)[0].splitlines()
    d = "megace/v1/site/site-0/device/+"
    assert block == ["user megace-infer-e0-w1", f"topic read {d}/up/infer", f"topic read {d}/up/register/#",
                     f"topic write {d}/down/prediction", f"topic write {d}/down/error"]
    # refusals: no such edge, an edge of another site, a revoked edge
    assert runner.invoke(app, ["provision", "workers", str(pki), "site-0", "e9"]).exit_code != 0
    assert runner.invoke(app, ["provision", "workers", str(pki), "site-0", "e1"]).exit_code != 0
    assert runner.invoke(app, ["provision", "revoke", str(pki), "megace-edge-e1"]).exit_code == 0
    assert runner.invoke(app, ["provision", "workers", str(pki), "site-1", "e1"]).exit_code != 0
    assert "megace-infer-e1-w1" not in Store.open(pki).entries


def test_the_worker_naming_and_group_conventions_agree_across_layers(tmp_path: Path) -> None:
    from edge_agent.infer_worker import group_name
    from edge_agent.worker_processes import WorkerProcesses

    assert Identity(Role.INFER, "e0-w3", "site-0").username == IDENTITY_PREFIX + "e0-w3"
    assert worker_id("e0", 3) == "e0-w3"
    from broker.address import BrokerAddress

    config = edge_config(tmp_path / "s", BrokerAddress("127.0.0.1", 1), {"site": "site-0", "edge_id": "e0"})
    assert WorkerProcesses(config, 3).worker_id(3) == worker_id("e0", 3)
    assert shared_request("site-0").split("/", 2)[1] == group_name(config)


def test_a_worker_logs_in_as_its_own_identity_on_the_edges_listener(tmp_path: Path) -> None:
    store = Store.init(tmp_path / "pki", ["localhost"])
    store.add(Identity(Role.EDGE, "e0", "site-0"), signing_key=True)
    issue_workers(store, "site-0", "e0", 1)
    ids = store.root / "identities"
    for mtls in (True, False):
        edge = store.address("megace-edge-e0", mtls=mtls)
        config = edge_config(tmp_path / "s", edge, {"site": "site-0", "edge_id": "e0",
                                                     "broker": edge.url() + "&protocol=auto",
                                                     "worker_identities": str(ids)})
        address, signer = worker_login(config, "e0-w1")
        folder = ids / "megace-infer-e0-w1"
        assert address.username == "megace-infer-e0-w1" and address.protocol == "auto"
        assert (address.host, address.port, address.ca_file) == (edge.host, edge.port, edge.ca_file)
        if mtls:
            assert (address.cert_file, address.key_file, address.password) == (
                str(folder / "client.crt"), str(folder / "client.key"), None)
        else:
            assert address.cert_file is None and address.password == (folder / "password").read_text().strip()
        assert signer is not None and signer.grant_info.name == "e0-w1"
        with pytest.raises(EdgeConfigError, match="megace-infer-e0-w2"):
            worker_login(config, "e0-w2")  # never issued
