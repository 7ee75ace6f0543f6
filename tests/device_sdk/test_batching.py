"""The SDK's batches on a real Mosquitto: linger and size flushes, publish_many, store-and-forward of batches."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from broker import topics
from broker.address import BrokerAddress
from broker.dedup import SequenceGuard
from broker.runners import MosquittoBroker
from broker.wire import FeatureBatch, FeatureRecord, Kind, decode_envelope
from broker.wire.bodies import decode_body
from device_sdk import DeviceClient
from device_sdk.batcher import Batcher
from tests.support.collector import Collector


def _record(i: int, device: str = "b1", *, quality: bool = False) -> FeatureRecord:
    return FeatureRecord(device, i, {"accel": np.full((10, 3), i, np.float32), "env": np.arange(4.0) + i},
                         label=i % 4, quality={"snr": 1.0} if quality else {})


def _until(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _messages(col: Collector) -> list[tuple[Kind, int, list[int]]]:
    """(kind, envelope seq, sample ids) of every features envelope, after de-duplication by seq."""
    guard = SequenceGuard()
    out = []
    for _, env in list(col.envelopes):
        if env.kind in (Kind.FEATURES, Kind.FEATURES_BATCH) and guard.accept(env.sender, env.seq):
            msg = decode_body(env)
            ids = msg.sample_ids().tolist() if isinstance(msg, FeatureBatch) else [msg.sample]
            out.append((env.kind, env.seq, ids))
    return out


def _records_of(col: Collector) -> list[FeatureRecord]:
    recs: list[FeatureRecord] = []
    for _, env in list(col.envelopes):
        msg = decode_body(env) if env.kind in (Kind.FEATURES, Kind.FEATURES_BATCH) else None
        recs.extend(msg.records() if isinstance(msg, FeatureBatch) else [msg] if msg is not None else [])
    return recs


@pytest.fixture
def collector(mosquitto_addr: BrokerAddress) -> Collector:
    col = Collector(mosquitto_addr, topics.site_device_uplinks("sb")).start()
    yield col
    col.stop()


def test_publish_many_sends_one_message_with_exactly_the_records(mosquitto_addr: BrokerAddress, collector: Collector,
                                                                 tmp_path: Path) -> None:
    recs = [_record(i) for i in range(10, 30)]
    with DeviceClient("sb", "b1", mosquitto_addr, store_path=tmp_path / "q.sqlite") as dev:
        seqs = dev.publish_many(recs)
        assert dev.flush(10)
    _until(lambda: len(_messages(collector)) >= 1, "the batch")
    (kind, seq, ids), = _messages(collector)
    assert kind is Kind.FEATURES_BATCH and ids == list(range(10, 30)) and seqs == [seq] * 20
    got = _records_of(collector)
    for want, have in zip(recs, got, strict=True):
        assert have.sample == want.sample and have.label == want.label
        assert all(np.array_equal(have.modalities[k], want.modalities[k]) for k in want.modalities)
    assert dev.counters["sent.features_batch"] == 1 and dev.counters["sent.batched_records"] == 20


def test_a_lingering_batch_flushes_on_size_and_on_time(mosquitto_addr: BrokerAddress, collector: Collector,
                                                       tmp_path: Path) -> None:
    dev = DeviceClient("sb", "b1", mosquitto_addr, store_path=tmp_path / "q.sqlite", linger_ms=60_000, batch_max=8)
    try:
        assert dev.connect(10)
        seqs = [dev.publish(_record(i)) for i in range(8)]  # full at 8: goes at once, not after a minute
        _until(lambda: len(_messages(collector)) == 1, "the size-triggered batch", 10)
        assert _messages(collector)[0] == (Kind.FEATURES_BATCH, seqs[0], list(range(8))) and len(set(seqs)) == 1
        dev._batcher.linger_s = 0.2  # a short linger for the rest: the supervisor sends without flush()
        for i in range(8, 11):
            dev.publish(_record(i))
        assert len(dev._batcher) == 3
        _until(lambda: len(_messages(collector)) == 2, "the linger-triggered batch", 10)
        assert _messages(collector)[1][2] == [8, 9, 10]
    finally:
        dev.close(5)


def test_records_that_do_not_stack_close_the_batch_and_keep_their_order(mosquitto_addr: BrokerAddress,
                                                                         collector: Collector, tmp_path: Path) -> None:
    short = FeatureRecord("b1", 3, {"accel": np.ones((5, 3), np.float32), "env": np.arange(4.0)}, label=0)
    unlabelled = FeatureRecord("b1", 4, {"accel": np.ones((10, 3), np.float32), "env": np.arange(4.0)})
    recs = [_record(0), _record(1), _record(2, quality=True), short, unlabelled, _record(5), _record(6)]
    with DeviceClient("sb", "b1", mosquitto_addr, store_path=tmp_path / "q.sqlite", linger_ms=10_000) as dev:
        for r in recs:
            dev.publish(r)
        assert dev.flush(10)  # flush sends the open batch
    _until(lambda: len(_messages(collector)) == 5, "five messages")
    got = _messages(collector)
    assert [ids for _, _, ids in got] == [[0, 1], [2], [3], [4], [5, 6]]
    assert [k for k, _, _ in got] == [Kind.FEATURES_BATCH, Kind.FEATURES, Kind.FEATURES_BATCH, Kind.FEATURES_BATCH,
                                      Kind.FEATURES_BATCH]
    assert [s for _, s, _ in got] == sorted(s for _, s, _ in got)  # seqs increase in publish order


def test_a_broker_outage_keeps_batches_in_the_store_and_replays_them_in_order(tmp_path: Path) -> None:
    broker = MosquittoBroker(persistence=True)
    broker.start()
    addr = BrokerAddress(broker.host, broker.port)
    col = Collector(addr, topics.site_device_uplinks("sb"), client_id="batch-col", clean_session=False)
    dev: DeviceClient | None = None
    try:
        col.start()
        dev = DeviceClient("sb", "b1", addr, store_path=tmp_path / "q.sqlite", batch_max=16, reconnect_max_delay=0.3)
        assert dev.connect(10)
        dev.publish_many([_record(i) for i in range(16)])
        assert dev.flush(10)
        broker.stop()
        _until(lambda: not dev.online, "the client to go offline")
        dev.publish_many([_record(i) for i in range(16, 80)])  # 4 batches of 16, while the broker is down
        assert len(dev.store) == 4  # a batch is one row of the queue
        queued = [decode_envelope(p) for _, _, _, p in dev.store.peek(None, 100)]
        assert [e.kind for e in queued] == [Kind.FEATURES_BATCH] * 4
        broker.start()
        assert dev.flush(30), f"{dev.pending} still pending"
        _until(lambda: len(_messages(col)) >= 5, "five batches at the subscriber", 30)
        got = _messages(col)
        assert [ids for _, _, ids in got] == [list(range(i, i + 16)) for i in range(0, 80, 16)]
        assert [s for _, s, _ in got] == sorted(s for _, s, _ in got)
        assert len(_records_of(col)) >= 80
    finally:
        col.stop()
        if dev is not None:
            dev.close(5)
        broker.close()


def test_the_batcher_splits_on_bytes_and_refuses_an_impossible_size() -> None:
    sent: list[tuple[FeatureBatch, int]] = []
    seqs = iter(range(100))
    record_bytes = 10 * 3 * 4 + 4 * 8
    b = Batcher(lambda batch, seq: sent.append((batch, seq)), lambda: next(seqs), linger_ms=1000, batch_max=100,
                batch_bytes=3 * record_bytes)
    for i in range(7):
        b.add(_record(i))
    assert [batch.count for batch, _ in sent] == [3, 3] and len(b) == 1 and b.deadline is not None
    assert b.flush() == 2 and [s for _, s in sent] == [0, 1, 2] and b.deadline is None
    with pytest.raises(ValueError):
        Batcher(lambda *_: None, lambda: 0, linger_ms=0, batch_max=5000, batch_bytes=1)


def test_closing_offline_stores_the_open_batch(tmp_path: Path) -> None:
    dev = DeviceClient("sb", "b1", BrokerAddress("127.0.0.1", 1), store_path=tmp_path / "q.sqlite", linger_ms=60_000)
    dev.connect(0.1)
    for i in range(3):
        dev.publish(_record(i))
    dev.close(1)
    again = DeviceClient("sb", "b1", BrokerAddress("127.0.0.1", 1), store_path=tmp_path / "q.sqlite")
    (row,) = again.store.peek(None, 10)
    assert decode_body(decode_envelope(row[3])).sample_ids().tolist() == [0, 1, 2]
    again.close(0.1)
