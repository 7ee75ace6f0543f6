"""The client's receipt mixin (``device_sdk.receipts.DeliveryReceipts``) in a real DeviceClient on a real Mosquitto.

Why: the book's own tests (test_receipt_book.py) decide *when* a held record is due; this checks what the client
does with it: the same bytes go out again (at once online, via the disk queue otherwise), a lost link puts held
records at the head of the disk queue, each registration says where re-sending may start, publishing waits while
``max_unreceipted`` records await a receipt, and ``flush``/``wait_delivered`` wait for what they promise. The
plain MQTT client of test_delivery_client.py plays the edge; the book's timers read the offset clock from there.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from broker import topics
from broker.address import BrokerAddress
from broker.wire import (
    CapabilityProfile,
    DeviceConfig,
    Kind,
    ModalityProfile,
    Receipt,
    RegisterRequest,
    decode_envelope,
    encode_envelope,
)
from device_sdk import DeviceClient
from device_sdk import receipts as receipts_module
from tests.device_sdk.test_delivery_client import DEV, Clock, Edge, _client, clock, edge, record, site, until
from tests.support.relay import TcpRelay

__all__ = ["clock", "edge", "site"]  # fixtures, used by name


def _receipts_on(dev: DeviceClient, edge: Edge) -> None:
    """The edge's config announces receipts (sent again until it lands: the device's subscription may still be on
    its way when ``connect`` returns)."""
    for _ in range(30):
        edge.send(topics.Downlink.CONFIG, Kind.CONFIG, DeviceConfig(["env"], receipts=True))
        wait_until = time.monotonic() + 0.5
        while time.monotonic() < wait_until:
            if dev._book.enabled:
                return
            time.sleep(0.01)
    raise AssertionError("receipts were never switched on")


def test_records_are_held_until_receipted_and_a_missing_one_goes_again_as_the_same_bytes(
        mosquitto_addr: BrokerAddress, edge: Edge, site: str, tmp_path: Path, clock: Clock) -> None:
    dev = _client(mosquitto_addr, site, tmp_path, receipt_timeout_s=600.0)
    try:
        assert dev.connect(10)
        _receipts_on(dev, edge)
        seqs = [dev.publish(record(i)) for i in range(4)]
        assert dev.flush(10) and dev.pending == 0
        assert dev.unreceipted == 4  # acknowledged by the broker, held for the edge's word
        assert not dev.wait_delivered(0.1)
        until(lambda: len(edge.uplinks(topics.Uplink.FEATURES)) == 4, "the records")  # the broker acks first
        sent = edge.uplinks(topics.Uplink.FEATURES)
        assert [decode_envelope(p).seq for _, p in sent] == seqs
        edge.send(topics.Downlink.RECEIPT, Kind.RECEIPT, Receipt(DEV, seqs[3], (seqs[1],)))
        until(lambda: dev.counters["receipted"] == 3, "the receipt")
        clock.advance(receipts_module.MISSING_GRACE_S)
        until(lambda: len(edge.uplinks(topics.Uplink.FEATURES)) == 5, "the missing record again")
        assert edge.uplinks(topics.Uplink.FEATURES)[4] == sent[1]  # same topic, seq and bytes
        assert dev.counters["resent"] == 1
        assert dev.flush(10) and dev.unreceipted == 1  # held again at its new acknowledgement
        delivered: list[bool] = []
        waiter = threading.Thread(target=lambda: delivered.append(dev.wait_delivered(10)), daemon=True)
        waiter.start()  # waiting before the last receipt is sent: it must wait for it
        edge.send(topics.Downlink.RECEIPT, Kind.RECEIPT, Receipt(DEV, seqs[3]))
        waiter.join(15)
        assert delivered == [True] and dev.unreceipted == 0 and dev.counters["receipted"] == 4
    finally:
        dev.close(5)


def test_a_stalled_edge_gets_the_oldest_held_record_as_a_probe(
        mosquitto_addr: BrokerAddress, edge: Edge, site: str, tmp_path: Path, clock: Clock) -> None:
    dev = _client(mosquitto_addr, site, tmp_path, receipt_timeout_s=30.0)
    try:
        assert dev.connect(10)
        _receipts_on(dev, edge)
        seqs = [dev.publish(record(i)) for i in range(3)]
        assert dev.flush(10) and dev.unreceipted == 3
        until(lambda: len(edge.uplinks(topics.Uplink.FEATURES)) == 3, "the records")
        first = edge.uplinks(topics.Uplink.FEATURES)[0]
        clock.advance(30.0)  # no receipt for the whole timeout
        until(lambda: len(edge.uplinks(topics.Uplink.FEATURES)) == 4, "the probe")
        assert edge.uplinks(topics.Uplink.FEATURES)[3] == first and dev.counters["resent"] == 1
        assert decode_envelope(first[1]).seq == seqs[0]
    finally:
        dev.close(0.5)


def test_a_lost_link_puts_held_records_on_disk_and_the_registration_says_where_resending_starts(
        mosquitto_addr: BrokerAddress, edge: Edge, site: str, tmp_path: Path, clock: Clock) -> None:
    """Held records go to the head of the disk queue and out again after the reconnect, same bytes; every
    registration carries ``resend_from``: the lowest seq the device may still send again."""
    relay = TcpRelay(mosquitto_addr)
    dev = _client(relay.address, site, tmp_path, receipt_timeout_s=600.0)

    def registrations() -> list[tuple[int, int]]:
        envs = [decode_envelope(p) for _, p in edge.uplinks(topics.Uplink.REGISTER)]
        return [(e.seq, e.body["resend_from"]) for e in envs]

    try:
        assert dev.connect(10)
        reg = dev.register(CapabilityProfile(DEV, {"env": ModalityProfile((4,))}))
        until(lambda: len(registrations()) == 1, "the registration")
        assert registrations() == [(reg, reg)]  # nothing to re-send: its own seq
        _receipts_on(dev, edge)
        seqs = [dev.publish(record(i)) for i in range(3)]
        assert dev.flush(10) and dev.unreceipted == 3
        edge.client.publish(topics.register_request(site),
                            encode_envelope(Kind.REGISTER_REQUEST, "edge", 99, RegisterRequest(site, "e").to_body()),
                            qos=1).wait_for_publish(5)
        until(lambda: len(registrations()) == 2, "the registration again")
        again, low = registrations()[1]
        assert again > seqs[-1] and low == seqs[0]  # the held records may come again
        until(lambda: len(edge.uplinks(topics.Uplink.FEATURES)) == 3, "the records")
        before = edge.uplinks(topics.Uplink.FEATURES)
        relay.sever()
        until(lambda: dev.counters["connects"] == 2, "the reconnect")
        until(lambda: len(edge.uplinks(topics.Uplink.FEATURES)) == 6, "the held records again")
        assert edge.uplinks(topics.Uplink.FEATURES)[3:] == before  # in order, same bytes
        until(lambda: len(registrations()) == 3, "the reconnect's registration")
        assert registrations()[2][1] == seqs[0]  # they were on disk when it went
        assert dev.flush(10) and dev.unreceipted == 3
    finally:
        relay.close()
        dev.close(0.5)


def test_publish_waits_while_max_unreceipted_records_await_a_receipt(
        mosquitto_addr: BrokerAddress, edge: Edge, site: str, tmp_path: Path) -> None:
    """Back-pressure: at 8 held (``max_unreceipted``) a publish waits, and goes on only once receipts bring them down
    to 6 (three quarters), not at 7."""
    dev = _client(mosquitto_addr, site, tmp_path, receipt_timeout_s=600.0, max_unreceipted=8)
    returned: list[int] = []
    publisher = threading.Thread(target=lambda: returned.extend(dev.publish(record(i)) for i in range(11)),
                                 daemon=True)

    def seen() -> int:
        return len(edge.uplinks(topics.Uplink.FEATURES))

    try:
        assert dev.connect(10)
        _receipts_on(dev, edge)
        publisher.start()
        until(lambda: seen() == 8, "eight records")
        time.sleep(0.3)  # room for a ninth, which must not come
        assert seen() == 8 and publisher.is_alive()
        seqs = [decode_envelope(p).seq for _, p in edge.uplinks(topics.Uplink.FEATURES)]
        edge.send(topics.Downlink.RECEIPT, Kind.RECEIPT, Receipt(DEV, seqs[0]))  # 7 held: still too many
        until(lambda: dev.counters["receipted"] == 1, "the first receipt")
        time.sleep(0.3)
        assert seen() == 8 and publisher.is_alive()
        edge.send(topics.Downlink.RECEIPT, Kind.RECEIPT, Receipt(DEV, seqs[1]))  # 6 held: go on, up to 8 again
        until(lambda: seen() == 10, "two more records")
        time.sleep(0.3)
        assert seen() == 10 and publisher.is_alive()
        edge.send(topics.Downlink.RECEIPT, Kind.RECEIPT, Receipt(DEV, decode_envelope(
            edge.uplinks(topics.Uplink.FEATURES)[-1][1]).seq))
        publisher.join(10)
        assert not publisher.is_alive() and len(returned) == 11
        until(lambda: seen() == 11, "the last record")
        edge.send(topics.Downlink.RECEIPT, Kind.RECEIPT, Receipt(DEV, returned[-1]))
        assert dev.wait_delivered(10) and dev.counters["receipted"] == 11
    finally:
        dev.close(5)


def test_flush_and_wait_delivered_give_up_at_their_timeout(
        mosquitto_addr: BrokerAddress, edge: Edge, site: str, tmp_path: Path) -> None:
    relay = TcpRelay(mosquitto_addr)
    dev = _client(relay.address, site, tmp_path, receipt_timeout_s=600.0)
    try:
        assert dev.connect(10)
        _receipts_on(dev, edge)
        dev.publish(record(0))
        assert dev.flush(10) and dev.unreceipted == 1
        assert not dev.wait_delivered(0.2)  # broker-acknowledged is not delivered
        assert relay.hold(up=False, down=True) == 1  # no acknowledgement reaches the device any more
        dev.publish(record(1))
        assert not dev.flush(0.2) and dev.pending == 1
    finally:
        relay.close()
        dev.close(0.5)


def test_a_resend_goes_straight_out_online_and_to_disk_offline_where_a_full_queue_counts_the_drop(
        mosquitto_addr: BrokerAddress, site: str, tmp_path: Path) -> None:
    """``_resend`` (called with the client's lock held, as the event loop does): online with an empty queue it
    publishes at once; away from a broker (a receipt applied as the link went) it queues on disk, never loses."""
    topic = topics.device_up(site, DEV, topics.Uplink.FEATURES)
    online = _client(mosquitto_addr, site, tmp_path / "on")
    try:
        assert online.connect(10)
        with online._lock:
            online._resend([(5, [(topic, b"five")])])
            assert len(online.store) == 0 and [p[:3] for p in online._inflight.values()] == [(5, topic, b"five")]
    finally:
        online.close(5)
    offline = DeviceClient(site, DEV, "mqtt://127.0.0.1:9", store_path=tmp_path / "q.sqlite", metrics_interval=0,
                           store_max_records=1, overflow="drop-newest")
    try:
        with offline._lock:
            offline._resend([(5, [(topic, b"five")]), (6, [(topic, b"six")]), (7, [(topic, b"seven")])])
        assert [(seq, t, p) for _, seq, t, p in offline.store.peek(None, 10)] == [(5, topic, b"five")]
        assert offline.counters["dropped_newest"] == 2  # the two that found the queue full
    finally:
        offline.close(1)
