"""The cloud binds each edge's key to its id and site: impersonation and seq hijacks are refused without trace.

The attack from the trust issue: an authenticated edge uploaded on its own topic as another edge id
with seq 2^62, was accepted, and locked the real edge out. With keys bound by provisioning, an
upload verifies only as the edge (and site) its key belongs to.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from broker import topics
from broker.signing import Signer, Verifier, generate_private_key, private_pem, public_pem
from broker.wire import decode_envelope
from cloud_aggregator.core import AggregatorCore
from cloud_aggregator.trust import CloudSigningError
from tests.cloud.test_cloud_poisoning import ADDR, BOTH, fingerprint, honest, no_trace
from tests.support.cloud_bus import cloud_config, update_payload


def pair(tmp_path: Path, name: str) -> tuple[Signer, Path, Path]:
    key = generate_private_key()
    (tmp_path / f"{name}.key").write_bytes(private_pem(key))
    (tmp_path / f"{name}.pub").write_bytes(public_pem(key.public_key()))
    return Signer(key), tmp_path / f"{name}.key", tmp_path / f"{name}.pub"


def upload(site: str, seq: int, *, edge: str | None = None) -> bytes:
    return update_payload(honest(site, seq), site=site, seq=seq, base_version=0, fingerprint=fingerprint(), rank=4,
                          samples=8, modalities=BOTH, edge=edge)


@pytest.fixture
def signed_cloud(tmp_path: Path):
    keys = {name: pair(tmp_path, name) for name in ("cloud", "edge-s1", "edge-s2", "rogue")}
    state = tmp_path / "state"
    config = cloud_config(state, ADDR, signing={
        "key_file": str(keys["cloud"][1]),
        "edges": {"edge-s1": {"site": "s1", "key": str(keys["edge-s1"][2])},
                  "edge-s2": {"site": "s2", "key": str(keys["edge-s2"][2])}},
    })
    core = AggregatorCore(config)
    yield core, {k: v[0] for k, v in keys.items()}, {k: v[2] for k, v in keys.items()}, state
    core.close()


def test_each_impersonation_is_refused_with_its_reason_and_leaves_no_trace(signed_cloud) -> None:
    core, signers, _, state = signed_cloud
    bad_sig = bytearray(signers["edge-s1"].sign(upload("s1", 1)))
    bad_sig[-5] ^= 0x01
    attempts = [
        ("unsigned", "s1", upload("s1", 1)),
        ("unknown_key", "s1", signers["rogue"].sign(upload("s1", 1))),
        ("bad_signature", "s1", bytes(bad_sig)),
        # edge-s2's genuine key, on site s1's topic (a stolen key used elsewhere)
        ("impersonation", "s1", signers["edge-s2"].sign(upload("s1", 1, edge="edge-s2"))),
        # edge-s2's key on its own topic, claiming to be edge-s1 with a huge seq (the seq hijack)
        ("impersonation", "s2", signers["edge-s2"].sign(upload("s2", 2**62, edge="edge-s1"))),
    ]
    for i, (reason, site, payload) in enumerate(attempts):
        before = core.rejected[reason]
        core.ingest(topics.adapter_up(site), payload)
        assert core.rejected[reason] == before + 1, (i, reason, dict(core.rejected))
    assert core.accepted == 0
    no_trace(core, state)
    # the real edge is not locked out: its genuine seq 1 goes through
    out = core.ingest(topics.adapter_up("s1"), signers["edge-s1"].sign(upload("s1", 1)))
    assert core.accepted == 1 and out


def test_what_the_cloud_publishes_verifies_under_its_key_only(signed_cloud) -> None:
    core, signers, pubs, _ = signed_cloud
    out = core.ingest(topics.adapter_up("s1"), signers["edge-s1"].sign(upload("s1", 1)))
    from broker.signing import load_public_key

    cloud = Verifier([load_public_key(pubs["cloud"])])
    feedback = [o for o in out if o.topic == topics.site_feedback("s1")]
    assert feedback
    for o in feedback:
        assert decode_envelope(cloud.open(o.payload)).sender == core.config.cloud_id
    with pytest.raises(Exception, match="does not trust"):
        Verifier([load_public_key(pubs["edge-s1"])]).open(feedback[0].payload)


def test_an_edge_binding_without_a_readable_key_stops_the_cloud_at_start(tmp_path: Path) -> None:
    config = cloud_config(tmp_path / "state", ADDR, signing={"edges": {"e1": {"site": "s1", "key": "/nope.pub"}}})
    with pytest.raises(CloudSigningError, match="e1"):
        AggregatorCore(config)
