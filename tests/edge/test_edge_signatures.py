"""An edge that pins the cloud's key: forged, unsigned, altered and rolled-back globals change nothing.

The attack from the trust issue: any client on an anonymous bus published a retained global at
version 10^9; the edge applied it, then ignored every real global as stale. Here the same bytes,
and their signed variants, go through the edge's network-free core.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from broker import topics
from broker.chunking import frames
from broker.signing import Signer, UnknownKeyError, Verifier, generate_private_key, private_pem, public_pem
from broker.wire import Kind, SiteFeedback, decode_envelope, encode_envelope
from edge_agent.core import EdgeCore
from tests.edge.test_edge_core import global_payload
from tests.edge.test_edge_core_paths import make_core, register

torch.set_num_threads(1)


def write_pair(tmp_path: Path, name: str) -> tuple[Signer, Path, Path]:
    key = generate_private_key()
    (tmp_path / f"{name}.key").write_bytes(private_pem(key))
    (tmp_path / f"{name}.pub").write_bytes(public_pem(key.public_key()))
    return Signer(key), tmp_path / f"{name}.key", tmp_path / f"{name}.pub"


@pytest.fixture
def keys(tmp_path: Path) -> dict:
    cloud, _, cloud_pub = write_pair(tmp_path, "cloud")
    edge, edge_key, edge_pub = write_pair(tmp_path, "edge")
    attacker, _, _ = write_pair(tmp_path, "attacker")
    return {"cloud": cloud, "cloud_pub": cloud_pub, "edge": edge, "edge_key": edge_key, "edge_pub": edge_pub,
            "attacker": attacker}


@pytest.fixture
def core(tmp_path: Path, keys: dict) -> EdgeCore:
    return make_core(tmp_path, {"signing": {"trusted_keys": [str(keys["cloud_pub"])],
                                            "key_file": str(keys["edge_key"])}})


def test_only_a_global_signed_by_the_pinned_cloud_key_is_installed(core: EdgeCore, keys: dict) -> None:
    forged = global_payload(core, 10**9, 0.5)
    attempts = {
        "UnsignedError": forged,
        "UnknownKeyError": keys["attacker"].sign(forged),
        "BadSignatureError": keys["cloud"].sign(global_payload(core, 2, 0.5))[:-1] + b"\x00",
    }
    for reason, payload in attempts.items():
        fx = core.ingest(topics.global_down(), payload, retained=True)
        assert fx.applies == [] and fx.out == [], reason
        assert core.counters[f"rejected.{reason}"] == 1
    assert core.state.global_version == -1
    genuine = core.ingest(topics.global_down(), keys["cloud"].sign(global_payload(core, 2, 0.5)))
    assert [(j.source, j.version) for j in genuine.applies] == [("global", 2)]


def test_a_signed_global_in_chunks_verifies_after_reassembly(core: EdgeCore, keys: dict) -> None:
    signed = keys["cloud"].sign(global_payload(core, 3, 0.25))
    parts = list(frames(topics.global_down(), signed, sender="cloud", seq=3, max_packet=4096))
    assert len(parts) > 2
    results = [core.ingest(t, p) for t, p in parts]
    assert [r.applies for r in results[:-1]] == [[]] * (len(parts) - 1)
    assert [(j.source, j.version) for j in results[-1].applies] == [("global", 3)]


def test_a_rolled_back_but_genuine_global_is_stale_not_installed(core: EdgeCore, keys: dict) -> None:
    assert core.trainer is not None
    newer = core.ingest(topics.global_down(), keys["cloud"].sign(global_payload(core, 5, 0.1))).applies[0]
    assert core.apply(newer.source, newer.version, newer.tensors) is not None
    replayed_old = keys["cloud"].sign(global_payload(core, 4, 0.9))
    fx = core.ingest(topics.global_down(), replayed_old, retained=True)
    assert fx.applies == [] and core.counters["global_stale"] == 1 and core.state.global_version == 5


def test_forged_site_feedback_is_refused_too(core: EdgeCore, keys: dict) -> None:
    register(core)
    body = SiteFeedback(site=core.site, version=9, rank=8, tensors={}, stats={"acc": 1.0}).to_body()
    forged = encode_envelope(Kind.SITE_FEEDBACK, "cloud", 9, body)
    fx = core.ingest(topics.site_feedback(core.site), forged)
    assert fx.out == [] and core.counters["rejected.UnsignedError"] == 1
    fx = core.ingest(topics.site_feedback(core.site), keys["cloud"].sign(forged))
    assert [m.topic.rsplit("/", 1)[1] for m in fx.out] == ["feedback"]


def test_downlinks_carry_the_edges_signature(core: EdgeCore, keys: dict) -> None:
    from megace_common.trust import SigningConfig

    (msg,) = register(core).out
    device_side = SigningConfig(trusted_keys=[str(keys["edge_pub"])]).verifier()
    assert device_side is not None
    env = decode_envelope(device_side.open(msg.payload))
    assert env.kind is Kind.CONFIG and env.sender == core.edge_id
    with pytest.raises(UnknownKeyError):
        Verifier([keys["cloud"].public_key]).open(msg.payload)


def test_an_edge_without_keys_still_reads_a_signing_clouds_globals(tmp_path: Path, keys: dict) -> None:
    plain = make_core(tmp_path)
    fx = plain.ingest(topics.global_down(), keys["cloud"].sign(global_payload(plain, 2, 0.5)))
    assert [(j.source, j.version) for j in fx.applies] == [("global", 2)]
    tensors = fx.applies[0].tensors
    assert all(np.allclose(v, 0.5) for v in tensors.values())
