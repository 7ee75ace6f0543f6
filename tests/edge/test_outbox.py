"""The upload outbox on a real broker: one upload at a time, re-sent until the cloud's verdict, never after it."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from broker import topics
from broker.address import BrokerAddress
from broker.aio import make_client
from broker.metrics import Counters
from broker.wire import Kind, encode_envelope
from edge_agent.outbox import Outbox
from edge_agent.state import StateStore
from tests.support.collector import Collector
from tests.support.edge_testkit import eventually


def upload(seq: int) -> bytes:
    return encode_envelope(Kind.ADAPTER, "e1", seq, {"n": seq})


def published(col: Collector, topic: str) -> list[int]:
    return [int(env.seq) for t, env in list(col.envelopes) if t == topic]


async def test_uploads_go_one_at_a_time_and_are_resent_until_settled(mosquitto_addr: BrokerAddress,
                                                                     tmp_path: Path) -> None:
    site = f"s{uuid.uuid4().hex[:6]}"
    topic = topics.adapter_up(site)
    counters, store = Counters(), StateStore(tmp_path / "state")
    outbox = Outbox(counters, store, edge_id="e1", topic=topic, limit=8, max_packet=256 * 1024, retry_s=0.3,
                    max_retry_s=0.6)
    with Collector(mosquitto_addr, *topics.subscriptions(topic)) as col:
        async with make_client(mosquitto_addr, identifier=f"ob-{uuid.uuid4().hex[:6]}") as client:
            sender = asyncio.create_task(outbox.send(client))
            try:
                outbox.extend([(1, upload(1)), (2, upload(2)), (3, upload(3))])
                # no verdict: seq 1 again after the retry delay, and seq 2 not before seq 1 is settled
                await eventually(lambda: published(col, topic).count(1) >= 2 and counters["upload_resends"] >= 1, 5,
                                 "seq 1 re-sent")  # the broker may deliver before the sender has its PUBACK
                assert set(published(col, topic)) == {1}
                assert counters["uploads"] == 1
                outbox.settle(1, "chunk_limit")  # the cloud's budget was full: send again, keep waiting
                sent = published(col, topic).count(1)
                await eventually(lambda: published(col, topic).count(1) > sent, 5, "seq 1 after a retryable refusal")
                assert set(published(col, topic)) == {1}
                assert len(outbox) == 3 and store.confirmed() == 0
                outbox.settle(1, None)  # accepted
                await eventually(lambda: 2 in published(col, topic), 5, "seq 2 after seq 1 settled")
                assert store.confirmed() == 1 and len(outbox) == 2
                outbox.settle(2, "norm_outlier")  # refused for its content: settled, never sent again
                await eventually(lambda: 3 in published(col, topic), 5, "seq 3")
                assert counters["uploads_refused"] == 1 and store.confirmed() == 2
                outbox.settle(99, None)  # a verdict for something not here changes nothing
                outbox.settle(3, "duplicate")  # the cloud already had it (a resend after a crash)
                assert len(outbox) == 0 and store.confirmed() == 3 and counters["uploads_settled"] == 3
                await asyncio.sleep(0.8)  # nothing is left to re-send
                tail = published(col, topic)
                assert tail.count(2) == 1 and tail.count(3) == 1 and tail[-1] == 3
            finally:
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)


def test_past_the_limit_the_oldest_unsettled_upload_is_dropped(tmp_path: Path) -> None:
    counters = Counters()
    outbox = Outbox(counters, StateStore(tmp_path), edge_id="e1", topic="t", limit=2, max_packet=1024)
    outbox.extend([(1, b"a"), (2, b"b"), (3, b"c")])
    assert [s for s, _ in outbox] == [2, 3] and counters["uploads_dropped"] == 1 and outbox.unsent == 2
