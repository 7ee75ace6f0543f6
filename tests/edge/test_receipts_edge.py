"""The edge's half of receipts: the gap-aware guard, its persistence, and when and what a receipt says.

Expectations are written out by hand (which seqs were skipped, which arrived), never read from the guard.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from broker import topics
from broker.address import BrokerAddress
from broker.dedup import GapGuard
from broker.wire import DeviceConfig, Kind, Receipt, decode_envelope, encode_envelope
from edge_agent.checkpoints import build_trainer
from edge_agent.core import EdgeCore, Outgoing
from edge_agent.receipts import ReceiptTracker
from edge_agent.registry import DeviceRegistry
from edge_agent.training.toy_task import ToyTask, toy_config
from tests.support.edge_testkit import edge_config, record, toy_profile

torch.set_num_threads(1)
DEV = "dev-1"
NOWHERE = BrokerAddress("127.0.0.1", 1)


# ------------------------------------------------------------------ the guard


def test_a_skipped_seq_is_accepted_once_later_and_repeats_are_dropped() -> None:
    g = GapGuard()
    assert [g.accept("d", s) for s in (0, 1, 4)] == [True, True, True]
    assert g.holes == {"d": {2, 3}}
    assert not g.seen("d", 3) and g.seen("d", 1) and g.seen("d", 4)
    assert g.accept("d", 3) is True  # the fill
    assert g.accept("d", 3) is False  # its repeat
    assert g.accept("d", 1) is False and g.accept("d", 4) is False
    assert (g.fills, g.duplicates, g.last["d"]) == (1, 3, 4)
    assert g.accept("d", 2) is True and "d" not in g.holes  # the last hole closed
    assert g.missing("d", 256) == (4, [])


def test_other_streams_seqs_are_not_gaps_whichever_arrives_first() -> None:
    g = GapGuard()
    g.accept("d", 0)
    g.foreign("d", 1)  # an inference request before the next record
    g.accept("d", 3)  # seq 2 really is missing
    g.accept("d", 5)
    g.foreign("d", 4)  # a registration seen after the record that skipped it
    assert g.holes == {"d": {2}}
    assert g.missing("d", 256) == (5, [2])


def test_gaps_are_bounded_and_the_oldest_abandoned_is_counted() -> None:
    g = GapGuard(max_gaps=4)
    g.accept("d", 0)
    g.accept("d", 10)  # skips 1..9: keeps the newest four, abandons five
    assert g.holes["d"] == {6, 7, 8, 9} and g.abandoned == 5
    g.accept("d", 20)  # skips 11..19 (nine more): of all 18 skipped seqs the newest four stay
    assert g.holes["d"] == {16, 17, 18, 19} and g.abandoned == 9 + 9 - 4
    assert g.accept("d", 7) is False  # abandoned: a late re-send is now a duplicate
    g.forget("d")
    assert "d" not in g.holes and "d" not in g.last and g.accept("d", 3) is True


def test_a_receipt_lists_at_most_limit_gaps_and_stops_below_the_next() -> None:
    g = GapGuard()
    for s in (0, 2, 4, 6, 8, 10):
        g.accept("d", s)
    assert g.missing("d", 256) == (10, [1, 3, 5, 7, 9])
    assert g.missing("d", 2) == (4, [1, 3])  # 5 is not listed, so the receipt may not claim it
    assert g.missing("other", 2) == (None, [])


def test_a_receipt_over_a_run_of_consecutive_gaps_claims_only_seqs_that_arrived() -> None:
    """A broker loses runs of consecutive records: ``upto`` must be a seq that arrived, every listed gap below it
    (the receipt codec refuses anything else; a receipt that skipped a gap would release a lost record)."""
    g = GapGuard()
    for s in (0, 1, 6, 7, 12):
        g.accept("d", s)  # gaps 2-5 and 8-11
    assert g.missing("d", 256) == (12, [2, 3, 4, 5, 8, 9, 10, 11])
    assert g.missing("d", 5) == (7, [2, 3, 4, 5])  # 8 is the first not listed; 6 and 7 arrived
    assert g.missing("d", 4) == (7, [2, 3, 4, 5])
    assert g.missing("d", 3) == (1, [])  # 2, 3, 4 listed would leave upto 4 on a gap: back to 1
    g2 = GapGuard()
    for s in (3, 9):
        g2.accept("d", s)
    g2.holes["d"] |= {0, 1, 2}  # a device whose first seqs never arrived
    assert g2.missing("d", 2) == (None, [])
    for limit in range(0, 10):  # every answer is a valid receipt body
        upto, missing = g.missing("d", limit)
        assert upto is not None and all(m < upto for m in missing) and missing == sorted(set(missing))
        Receipt("d", upto, tuple(missing)).to_body()


def test_holes_survive_the_registrys_checkpoint_round_trip() -> None:
    reg = DeviceRegistry(toy_config())
    for s in (0, 1, 5):
        reg.is_new("features", "d", s)
    reg.is_new("infer", "d", 9)
    data = reg.to_dict()
    back = DeviceRegistry(toy_config())
    back.load_dict(data)
    assert back.features.holes == {"d": {2, 3, 4}} and back.guards["features"] is back.features
    assert back.is_duplicate("features", "d", 1) and not back.is_duplicate("features", "d", 3)
    assert back.is_new("features", "d", 3) and not back.is_new("features", "d", 3)
    assert back.guards["infer"].last == {"d": 9} and not back.is_new("infer", "d", 8)  # plain high-water mark
    back.reset_sequence("d")
    assert "d" not in back.features.holes


# ------------------------------------------------------------- the core and the tracker


@pytest.fixture
def core(tmp_path: Path) -> EdgeCore:
    config = edge_config(tmp_path / "state", NOWHERE, {"training": {"min_new_samples": 1000}})
    return EdgeCore(config, trainer=build_trainer(config))


def _ingest(core: EdgeCore, kind: Kind, seq: int, body: dict) -> object:
    what = {Kind.REGISTER: topics.Uplink.REGISTER, Kind.INFER: topics.Uplink.INFER}.get(kind, topics.Uplink.FEATURES)
    return core.ingest(topics.device_up(core.site, DEV, what), encode_envelope(kind, DEV, seq, body))


def _sample() -> dict:
    return ToyTask(toy_config(), seed=0).sample(1, modalities=("imu", "env"))


def test_the_config_announces_receipts_and_records_are_durable_and_owed_a_receipt(core: EdgeCore) -> None:
    fx = _ingest(core, Kind.REGISTER, 0, toy_profile(DEV).to_body())
    cfg = DeviceConfig.from_body(decode_envelope(fx.out[0].payload).body)
    assert cfg.receipts is True
    unlabeled = record(DEV, 1, _sample(), label=False).to_body()
    fx = _ingest(core, Kind.FEATURES, 1, unlabeled)
    assert fx.receipt == DEV and fx.durable  # logged, so a replay rebuilds the guard without a false gap
    fx = _ingest(core, Kind.FEATURES, 1, unlabeled)
    assert fx.receipt == DEV and not fx.durable  # a repeat: the device missed a receipt, it gets one again
    _ingest(core, Kind.INFER, 2, record(DEV, 2, _sample()).to_body())
    _ingest(core, Kind.FEATURES, 4, unlabeled)
    assert core.registry.features.holes == {DEV: {3}}  # 0 registration and 2 request: not records


def test_without_receipts_the_config_says_nothing(tmp_path: Path) -> None:
    config = edge_config(tmp_path / "s", NOWHERE, {"receipts": False})
    fx = EdgeCore(config).ingest(topics.device_up(config.site, DEV, topics.Uplink.REGISTER),
                                 encode_envelope(Kind.REGISTER, DEV, 0, toy_profile(DEV).to_body()))
    assert "receipts" not in decode_envelope(fx.out[0].payload).body


async def test_a_receipt_follows_the_commit_and_says_what_was_sealed(core: EdgeCore) -> None:
    sent: list[Outgoing] = []
    tracker = ReceiptTracker(core, sent.extend, core.counters, interval_s=0.3)
    _ingest(core, Kind.REGISTER, 0, toy_profile(DEV).to_body())
    for seq in (1, 2, 5):
        _ingest(core, Kind.FEATURES, seq, record(DEV, seq, _sample()).to_body())
        tracker.touched(DEV)
    tracker.seal()  # a commit starts: it covers 1, 2 and 5
    _ingest(core, Kind.FEATURES, 7, record(DEV, 7, _sample()).to_body())  # after the seal: not yet durable
    tracker.touched(DEV)
    assert sent == []  # nothing before the commit completes
    tracker.durable()
    (msg,) = sent
    assert msg.topic == topics.device_down(core.site, DEV, topics.Downlink.RECEIPT)
    assert (msg.qos, msg.retain) == (1, False)
    env = decode_envelope(msg.payload)
    assert env.kind is Kind.RECEIPT and env.sender == core.edge_id
    assert Receipt.from_body(env.body) == Receipt(DEV, 5, (3, 4))
    tracker.seal()
    tracker.durable()
    assert len(sent) == 1  # coalesced: the next one waits for the interval
    await asyncio.sleep(0.45)
    assert Receipt.from_body(decode_envelope(sent[1].payload).body) == Receipt(DEV, 7, (3, 4, 6))
    assert core.counters["receipts_sent"] == 2


async def test_a_signing_edge_signs_its_receipts(tmp_path: Path) -> None:
    from broker.signing import Signer, Verifier, generate_private_key, private_pem

    key = generate_private_key()
    (tmp_path / "edge.key").write_bytes(private_pem(key))
    config = edge_config(tmp_path / "s", NOWHERE, {"signing": {"key_file": str(tmp_path / "edge.key")}})
    core = EdgeCore(config)
    sent: list[Outgoing] = []
    tracker = ReceiptTracker(core, sent.extend, core.counters, interval_s=0.0, durable_on_touch=True)
    core.registry.is_new("features", DEV, 3)
    tracker.touched(DEV)
    tracker.touched(DEV)  # already logged (a receiver process): one receipt per turn of the loop, not per record
    assert sent == []
    await asyncio.sleep(0)
    assert len(sent) == 1
    env = decode_envelope(Verifier([Signer(key).public_key]).open(sent[0].payload))
    assert env.kind is Kind.RECEIPT and Receipt.from_body(env.body) == Receipt(DEV, 3, ())


def test_a_floor_closes_the_gaps_below_it_and_a_restarted_devices_seq_jump_opens_none() -> None:
    g = GapGuard()
    for s in (0, 3, 6):
        g.accept("d", s)
    g.floor("d", 5)  # the device holds nothing below 5 any more
    assert g.holes == {"d": {5}} and g.closed == 3  # holes 1, 2 and 4 closed; 5 may still come
    g.floor("d", 2)  # a floor never goes down (an old retained registration)
    assert g.holes == {"d": {5}}
    g.floor("d", 1000)  # restarted: its next block starts at 1000, its registration is seq 1000
    g.foreign("d", 1000)
    assert g.accept("d", 1001) and "d" not in g.holes and g.abandoned == 0
    assert g.missing("d", 256) == (1001, [])


def test_a_registrations_resend_from_reaches_the_guard_and_the_checkpoint(core: EdgeCore) -> None:
    from dataclasses import replace

    _ingest(core, Kind.REGISTER, 0, toy_profile(DEV).to_body())
    for seq in (1, 4):
        _ingest(core, Kind.FEATURES, seq, record(DEV, seq, _sample()).to_body())
    assert core.registry.features.holes == {DEV: {2, 3}}
    _ingest(core, Kind.REGISTER, 1000, replace(toy_profile(DEV), resend_from=3).to_body())
    assert core.registry.features.holes == {DEV: {3}} and core.registry.features.floors == {DEV: 3}
    back = DeviceRegistry(toy_config())
    back.load_dict(core.registry.to_dict())
    assert back.features.floors == {DEV: 3} and back.features.holes == {DEV: {3}}
