"""Retained chunked transfers read by exact chunk names (:mod:`broker.exact_chunks`) on every broker.

The case that failed on RabbitMQ: an edge subscribing after the cloud published a chunked global got
none of its retained chunks through ``.../global/chunk/+``. Here the global is published first, then read.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from broker import topics
from broker.address import BrokerAddress
from broker.capabilities import MATRIX
from broker.chunking import frames
from broker.exact_chunks import ExactChunks
from broker.inbox import Inbox
from broker.wire import GlobalAdapter, Kind, encode_envelope
from broker.wire.bodies import decode_body
from tests.broker.test_matrix import _publish

WAIT_S = 60.0
PACKET = 8 * 1024


@pytest.fixture(params=sorted(MATRIX))
def addr(request: pytest.FixtureRequest) -> BrokerAddress:
    return request.getfixturevalue(f"{request.param}_addr")


def _global(version: int, n: int) -> tuple[bytes, np.ndarray]:
    w = np.random.default_rng(version).standard_normal(n).astype(np.float32)
    return encode_envelope(Kind.GLOBAL, "cloud", version, GlobalAdapter(version, "fp", "fedavg", 8, 8.0,
                                                                        {"w": w}).to_body()), w


class ExactReader:
    """A late subscriber that reads one retained topic the way the edge does: exact names, grown on demand."""

    def __init__(self, addr: BrokerAddress, base: str, initial: int) -> None:
        self.exact = ExactChunks([base], initial=initial)
        self.inbox = Inbox()
        self.got: dict[int, Any] = {}
        self.subscribes = 0
        self._cond = threading.Condition()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"exact-{uuid.uuid4().hex[:8]}",
                             protocol=mqtt.MQTTv311)
        self.c.on_connect = lambda c, *_: self._subscribe(self.exact.filters())
        self.c.on_message = self._on_message
        self.c.connect(addr.host, addr.port)
        self.c.loop_start()

    def _subscribe(self, filters: list[str]) -> None:
        if filters:
            self.subscribes += 1
            self.c.subscribe([(f, 1) for f in filters])

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        self._subscribe(self.exact.observe(msg.topic, msg.payload))
        got = self.inbox.accept(msg.topic, msg.payload)
        if got is not None:
            body = decode_body(got[1])
            with self._cond:
                self.got[body.version] = body
                self._cond.notify_all()

    def wait_version(self, version: int) -> Any:
        with self._cond:
            assert self._cond.wait_for(lambda: version in self.got, WAIT_S), f"version {version} never arrived"
            return self.got[version]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def test_a_late_reader_gets_a_retained_chunked_global_and_later_larger_ones(addr: BrokerAddress) -> None:
    base = topics.site_feedback(f"matrix-{uuid.uuid4().hex[:8]}")  # a retained topic of its own per test
    first, w1 = _global(1, 30_000)  # about 120 KB: 15 chunks of 8 KiB, more than the 4 subscribed up front
    parts = frames(base, first, sender="cloud", seq=1, max_packet=PACKET)
    assert len(parts) > 4
    _publish(addr, *[(t, p, True) for t, p in parts])
    reader = ExactReader(addr, base, initial=4)
    try:
        assert np.array_equal(reader.wait_version(1).tensors["w"], w1)
        assert reader.subscribes == 2  # the initial names, then the rest once chunk 0..3 announced the count
        second, w2 = _global(2, 60_000)  # live and larger still: the names beyond the first count are added
        parts2 = frames(base, second, sender="cloud", seq=2, max_packet=PACKET)
        assert len(parts2) > len(parts)
        _publish(addr, *[(t, p, True) for t, p in parts2])
        assert np.array_equal(reader.wait_version(2).tensors["w"], w2)
    finally:
        reader.close()
        _publish(addr, *[(topics.chunk(base, i), b"", True) for i in range(len(parts2))])


def test_exact_filters_grow_only_for_a_readable_larger_count_of_a_watched_topic() -> None:
    g, other = topics.global_down(), topics.site_feedback("s1")
    ex = ExactChunks([g], initial=2, limit=10)
    assert ex.filters() == [g, f"{g}/chunk/0", f"{g}/chunk/1"]
    chunk = frames(g, b"x" * 5000, sender="cloud", max_packet=1000)  # 7 chunks of 744 bytes
    count = len(chunk)
    assert ex.covers(chunk[3][0]) and not ex.covers(g) and not ex.covers(f"{other}/chunk/0")
    assert ex.observe(f"{other}/chunk/0", chunk[0][1]) == []  # not a watched topic
    assert ex.observe(chunk[0][0], b"") == []  # a cleared retained chunk
    assert ex.observe(chunk[0][0], b"\x87not an envelope") == []  # malformed: the inbox rejects it, not us
    assert ex.observe(chunk[0][0], chunk[0][1]) == [f"{g}/chunk/{i}" for i in range(2, count)]
    assert ex.observe(chunk[1][0], chunk[1][1]) == []  # the same count again adds nothing
    assert ex.filters() == [g, *(f"{g}/chunk/{i}" for i in range(count))]
    huge = frames(g, b"y" * 20_000, sender="cloud", max_packet=1000)  # 27 chunks, above the limit of 10
    assert ex.observe(huge[0][0], huge[0][1]) == [f"{g}/chunk/{i}" for i in range(count, 10)]
    assert ex.clipped == 1 and len(ex.filters()) == 11


def test_the_loop_clears_stale_retained_chunks_on_every_broker(addr: BrokerAddress) -> None:
    """``megace run`` on a broker that outlives runs deletes an earlier run's chunked retained transfer, found by
    exact chunk names where the broker's wildcards give nothing retained (RabbitMQ)."""
    from megace.loop.retained import clear_retained, find_retained

    base = topics.site_feedback(f"stale-{uuid.uuid4().hex[:8]}")
    stale, _ = _global(7, 10_000)
    parts = frames(base, stale, sender="cloud", seq=7, max_packet=PACKET)
    _publish(addr, *[(t, p, True) for t, p in parts])
    names = ExactChunks([base]).filters()
    # an earlier run's transfer is stored before this run starts; amqtt acknowledges a retained publish before
    # it stores it, and a clear that overtook the store left chunks behind under a loaded full run
    _within(10.0, lambda: find_retained(addr, names) >= {t for t, _ in parts}, "the stale transfer retained")
    assert set(clear_retained(addr, [base])) >= {t for t, _ in parts}
    _within(10.0, lambda: find_retained(addr, names) == set(), "nothing left, even by exact name")


def _within(seconds: float, done: Any, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, f"not within {seconds} s: {what}"
        time.sleep(0.1)
