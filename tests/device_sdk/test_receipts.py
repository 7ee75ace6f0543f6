"""The device's half of receipts: the wire body, the book of held records, and forged receipts on a real broker.

A forged receipt would make a device forget records the edge never got: in secure mode only one signed by the
edge's key, naming this device, releases anything.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from broker import topics
from broker.address import BrokerAddress
from broker.errors import DecodeError
from broker.metrics import Counters
from broker.signing import Signer, generate_private_key, public_pem
from broker.wire import DeviceConfig, FeatureRecord, Kind, Receipt, encode_envelope
from device_sdk import DeviceClient
from device_sdk import receipts as book_module
from device_sdk.receipts import ReceiptBook

FEATURES = "megace/v1/site/s/device/d/up/features"


# ------------------------------------------------------------------ the body


def test_a_receipt_round_trips_and_says_what_it_covers() -> None:
    r = Receipt("d", 10, (2, 7))
    assert Receipt.from_body(r.to_body()) == r
    assert [s for s in range(12) if r.covers(s)] == [0, 1, 3, 4, 5, 6, 8, 9, 10]


@pytest.mark.parametrize("body", [
    {"device": "d", "upto": 5, "missing": [3, 2]},  # not ascending
    {"device": "d", "upto": 5, "missing": [2, 2]},  # repeated
    {"device": "d", "upto": 5, "missing": [5]},  # not below upto
    {"device": "d", "upto": -1},
    {"device": "d", "upto": 5, "missing": [True]},
    {"device": "d", "upto": 1000, "missing": list(range(257))},  # longer than the bound
    {"device": "a.b", "upto": 5},
    {"upto": 5},
])
def test_malformed_receipts_are_refused(body: dict) -> None:
    with pytest.raises(DecodeError):
        Receipt.from_body(body)


# ------------------------------------------------------------------ the book


def _book(timeout: float = 60.0) -> tuple[ReceiptBook, Counters]:
    counters = Counters()
    book = ReceiptBook(FEATURES, 100, timeout, counters)
    book.set_enabled(True)
    return book, counters


def test_only_record_messages_are_held_and_a_receipt_releases_what_it_covers() -> None:
    book, counters = _book()
    for seq in range(5):
        book.hold((seq, FEATURES, b"r%d" % seq, None))
    book.hold((5, FEATURES.replace("features", "infer"), b"q", None))
    book.hold((6, FEATURES + "/chunk/0", b"c0", None))
    book.hold((6, FEATURES + "/chunk/1", b"c1", None))
    assert sorted(book.held) == [0, 1, 2, 3, 4, 6]
    assert book.apply(Receipt("d", 3, (1,))) == []  # 1 is missing but was acknowledged just now
    assert sorted(book.held) == [1, 4, 6] and counters["receipted"] == 3
    rows = book.take_all()
    assert rows == [(1, FEATURES, b"r1"), (4, FEATURES, b"r4"), (6, FEATURES + "/chunk/0", b"c0"),
                    (6, FEATURES + "/chunk/1", b"c1")]
    assert counters["resent"] == 3 and not book.held


def test_missing_and_overtaken_records_go_again_and_a_stalled_edge_gets_backed_off_probes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(book_module.time, "monotonic", lambda: now[0])
    book, counters = _book(timeout=5.0)
    for seq in range(4):
        book.hold((seq, FEATURES, b"x%d" % seq, None))
    assert book.apply(Receipt("d", 1, (0,))) == []  # 0 listed missing, but acknowledged under a second ago
    now[0] += book_module.MISSING_GRACE_S
    assert book.due() == [(0, [(FEATURES, b"x0")])]  # again, same bytes
    now[0] += 2.0
    assert book.due() == []  # 2 and 3 are not covered yet, but the edge moved 3 s ago
    now[0] += 2.0
    assert [seq for seq, _ in book.due()] == [2]  # 5 s without progress: the oldest held alone, as a probe
    book.hold((2, FEATURES, b"x2", None))  # the probe's PUBACK
    now[0] += 0.2
    # the edge covers the probe: 3, acknowledged before the probe went again and not covered, was lost
    assert [seq for seq, _ in book.apply(Receipt("d", 2))] == [3]
    book.hold((3, FEATURES, b"x3", None))
    now[0] += 5.0
    assert [seq for seq, _ in book.due()] == [3]  # nothing moves: probes back off, 5 s, then 10 s
    book.hold((3, FEATURES, b"x3", None))
    now[0] += 6.0
    assert book.due() == []
    now[0] += 4.0
    assert [seq for seq, _ in book.due()] == [3]
    assert counters["resent"] == 5 and counters["receipted"] == 2  # 1, then the probe 2
    book.set_enabled(False)  # an edge that stopped sending receipts: nothing is held any more
    assert not book.held and not book.full(0)


# ------------------------------------------------------- forged receipts, real broker


def _records(n: int) -> list[FeatureRecord]:
    return [FeatureRecord("d1", i, {"env": np.full(4, i, np.float32)}, label=0) for i in range(n)]


def _wait(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_forged_receipts_release_nothing_in_secure_mode(mosquitto_addr: BrokerAddress, tmp_path: Path) -> None:
    edge, attacker = Signer(generate_private_key()), Signer(generate_private_key())
    (tmp_path / "edge.pub").write_bytes(public_pem(edge.public_key))
    site = f"s{uuid.uuid4().hex[:6]}"
    dev = DeviceClient(site, "d1", mosquitto_addr, store_path=tmp_path / "q.sqlite", edge_key=tmp_path / "edge.pub",
                       receipt_timeout_s=600.0, metrics_interval=0)
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"attacker-{uuid.uuid4().hex[:6]}")

    def send(what: topics.Downlink, payload: bytes) -> None:
        pub.publish(topics.device_down(site, "d1", what), payload, qos=1).wait_for_publish(5)

    def receipt(device: str, upto: int, seq: int) -> bytes:
        return encode_envelope(Kind.RECEIPT, "edge", seq, Receipt(device, upto).to_body())

    try:
        assert dev.connect(10)
        time.sleep(0.3)  # the device's subscription is in place
        pub.connect(mosquitto_addr.host, mosquitto_addr.port)
        pub.loop_start()
        send(topics.Downlink.CONFIG, attacker.sign(encode_envelope(Kind.CONFIG, "edge", 1, DeviceConfig(
            ["env"], receipts=True).to_body())))
        assert _wait(lambda: dev.counters["rejected.UnknownKeyError"] == 1)
        assert not dev._book.enabled  # a forged config does not switch receipts on either
        send(topics.Downlink.CONFIG, edge.sign(encode_envelope(Kind.CONFIG, "edge", 2, DeviceConfig(
            ["env"], receipts=True).to_body())))
        assert _wait(lambda: dev._book.enabled)
        for r in _records(5):
            dev.publish(r)
        assert dev.flush(10)
        assert dev.unreceipted == 5  # acknowledged by the broker, held for the edge's word
        send(topics.Downlink.RECEIPT, receipt("d1", 10_000, 3))  # unsigned
        send(topics.Downlink.RECEIPT, attacker.sign(receipt("d1", 10_000, 4)))  # someone else's key
        send(topics.Downlink.RECEIPT, edge.sign(receipt("d9", 10_000, 5)))  # the edge's, for another device
        assert _wait(lambda: dev.counters["rejected.ReceiptMismatchError"] == 1)
        assert dev.counters["rejected.UnsignedError"] == 1 and dev.counters["rejected.UnknownKeyError"] == 2
        assert dev.unreceipted == 5 and dev.counters["receipted"] == 0
        assert not dev.wait_delivered(0.2)
        send(topics.Downlink.RECEIPT, edge.sign(receipt("d1", 10_000, 6)))  # the real thing
        assert dev.wait_delivered(10)
        assert dev.unreceipted == 0 and dev.counters["receipted"] == 5 and dev.counters["resent"] == 0
    finally:
        pub.loop_stop()
        pub.disconnect()
        dev.close()
