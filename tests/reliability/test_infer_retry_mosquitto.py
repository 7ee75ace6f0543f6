"""Inference requests a real broker acknowledged and lost are asked again, and each reaches the application once.

Loss, for real: Mosquitto with ``max_queued_messages`` PUBACKs every request while the edge is away (a clean stop:
its persistent session stays) and keeps only ``QUEUE`` of them (``test_receipts_mosquitto.py`` checks that premise
with raw paho clients). With ``infer_retry_s`` the device asks again (same seq) and every request is answered
exactly once; with ``infer_retry_s=0`` the same run leaves exactly what Mosquitto dropped unanswered.

Double answers, for real: the edge's answer path is slowed beyond ``infer_retry_s`` (a slow model), so the device
asks again while the edge is still computing; when the edge takes the pending request as lost (its pending time
limit set low here) it answers the repeat afresh, under another envelope seq: the device gets two answers and
hands the application one (``infer_duplicate_answers``).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from broker.address import BrokerAddress
from broker.wire import FeatureRecord, Kind
from device_sdk import DeviceClient
from tests.reliability.test_receipts_mosquitto import QUEUE, SmallQueueMosquitto, small_queue  # noqa: F401
from tests.support.edge_testkit import edge_config, eventually, running, toy_profile

ASKED = 20
"""Requests sent while the edge is away: more than Mosquitto queues for it."""


def _request(device: str, sample: int) -> FeatureRecord:
    return FeatureRecord(device, sample, {"imu": np.zeros((4, 6), np.float32),
                                          "env": np.full(8, float(sample), np.float32)})


class App:
    """The application's downlink callback: what it was handed, per sample."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.predictions: Counter[int] = Counter()
        self.errors: list[Any] = []

    def __call__(self, kind: Kind, message: Any) -> None:
        with self.lock:
            if kind is Kind.PREDICTION:
                self.predictions[int(message.sample)] += 1
            elif kind is Kind.ERROR:
                self.errors.append(message)


async def _lost_requests(tmp_path: Path, broker: SmallQueueMosquitto, *, retry_s: float) -> tuple[App, DeviceClient]:
    addr = BrokerAddress(broker.host, broker.port)
    config = edge_config(tmp_path / "edge", addr, {"training": {"min_new_samples": 100_000}})
    app = App()
    dev = DeviceClient(config.site, "gw1", addr, on_downlink=app, store_path=tmp_path / "dev.sqlite",
                       metrics_interval=0, infer_retry_s=retry_s, infer_max_tries=10)
    try:
        async with running(config):
            assert await asyncio.to_thread(dev.connect, 10.0)
            await asyncio.to_thread(dev.register, toy_profile("gw1"))
            await eventually(lambda: dev.counters["received.config"] >= 1, 10, "the edge's config")
        # the edge is away: the broker acknowledges every request and keeps QUEUE of them
        for sample in range(ASKED):
            await asyncio.to_thread(dev.request_inference, _request("gw1", sample))
        assert await asyncio.to_thread(dev.flush, 10.0)
        assert dev.counters["acked"] >= ASKED
        async with running(config):
            await eventually(lambda: len(app.predictions) >= QUEUE, 30, "the queued requests' answers")
            if retry_s > 0:
                await eventually(lambda: len(app.predictions) == ASKED, 40, "every request answered")
            await asyncio.sleep(2.0 + 2 * retry_s)  # a second answer, or one more re-send, would be here by now
        return app, dev
    finally:
        await asyncio.to_thread(dev.close, 5.0)


async def test_requests_the_broker_dropped_are_asked_again_and_answered_once(
        tmp_path: Path, small_queue: SmallQueueMosquitto) -> None:  # noqa: F811
    app, dev = await _lost_requests(tmp_path, small_queue, retry_s=0.5)
    assert app.predictions == Counter(range(ASKED)) and app.errors == []  # every request, one answer each
    assert dev.counters["infer_resent"] >= ASKED - QUEUE  # what Mosquitto dropped went again, same seq
    assert dev.counters["infer_given_up"] == 0 and not dev._requests.outstanding


async def test_without_retries_the_requests_mosquitto_dropped_stay_unanswered(
        tmp_path: Path, small_queue: SmallQueueMosquitto) -> None:  # noqa: F811
    app, dev = await _lost_requests(tmp_path, small_queue, retry_s=0.0)
    assert app.predictions == Counter(range(QUEUE))  # the queue's worth; the rest was never answered
    assert dev.counters["infer_resent"] == 0 and len(dev._requests.outstanding) == ASKED - QUEUE


async def _slow_answers(tmp_path: Path, addr: BrokerAddress, *, pending_ttl_s: float) -> tuple[App, DeviceClient,
                                                                                               dict[str, int]]:
    """Three requests, the edge's model taking 1.5 s per batch, the device asking again after 0.3 s."""
    config = edge_config(tmp_path / "edge", addr, {"training": {"min_new_samples": 100_000}})
    app = App()
    dev = DeviceClient(config.site, "gw1", addr, on_downlink=app, store_path=tmp_path / "dev.sqlite",
                       metrics_interval=0, infer_retry_s=0.3, infer_max_tries=3)
    try:
        async with running(config) as agent:
            agent.core.answers.pending_ttl_s = pending_ttl_s
            predictor = agent.serving.predictor
            assert predictor is not None and agent.serving.onnx is None
            fast = predictor.predict

            def slow(samples: Any) -> Any:
                time.sleep(1.5)
                return fast(samples)

            predictor.predict = slow  # type: ignore[method-assign]
            assert await asyncio.to_thread(dev.connect, 10.0)
            await asyncio.to_thread(dev.register, toy_profile("gw1"))
            await eventually(lambda: dev.counters["received.config"] >= 1, 10, "the edge's config")
            for sample in range(3):
                await asyncio.to_thread(dev.request_inference, _request("gw1", sample))
            await eventually(lambda: len(app.predictions) == 3, 30, "the answers")
            await eventually(lambda: not dev._requests.outstanding, 10, "every request completed")
            await asyncio.sleep(4.0)  # the later answers arrive meanwhile
            counts = {k: int(agent.counters[k]) for k in ("predictions", "infer_repeats_pending",
                                                          "infer_repeats_fresh", "infer_repeats_answered")}
        return app, dev, counts
    finally:
        await asyncio.to_thread(dev.close, 5.0)


async def test_a_request_answered_twice_reaches_the_application_once(tmp_path: Path,
                                                                     mosquitto_addr: BrokerAddress) -> None:
    app, dev, edge = await _slow_answers(tmp_path, mosquitto_addr, pending_ttl_s=0.1)
    assert dev.counters["infer_resent"] >= 1
    assert edge["infer_repeats_fresh"] >= 1 and edge["predictions"] > 3  # the edge did answer some request twice
    assert app.predictions == Counter(range(3))  # ... and the application saw one answer per request
    assert dev.counters["infer_duplicate_answers"] == edge["predictions"] - 3


async def test_a_repeat_while_the_edge_computes_gets_no_second_answer(tmp_path: Path,
                                                                      mosquitto_addr: BrokerAddress) -> None:
    app, dev, edge = await _slow_answers(tmp_path, mosquitto_addr, pending_ttl_s=30.0)
    assert dev.counters["infer_resent"] >= 1 and edge["infer_repeats_pending"] >= 1
    assert edge["predictions"] == 3 and edge["infer_repeats_fresh"] == 0
    assert app.predictions == Counter(range(3)) and dev.counters["infer_duplicate_answers"] == 0


async def test_requests_answered_in_time_are_never_sent_again(tmp_path: Path, mosquitto_addr: BrokerAddress) -> None:
    """The control: with answers in time, the retry timer never fires (no extra traffic, no work at the edge)."""
    config = edge_config(tmp_path / "edge", mosquitto_addr, {"training": {"min_new_samples": 100_000}})
    app = App()
    dev = DeviceClient(config.site, "gw1", mosquitto_addr, on_downlink=app, store_path=tmp_path / "dev.sqlite",
                       metrics_interval=0, infer_retry_s=2.0)
    try:
        async with running(config) as agent:
            assert await asyncio.to_thread(dev.connect, 10.0)
            await asyncio.to_thread(dev.register, toy_profile("gw1"))
            await eventually(lambda: dev.counters["received.config"] >= 1, 10, "the edge's config")
            for sample in range(30):
                await asyncio.to_thread(dev.request_inference, _request("gw1", sample))
                await asyncio.sleep(0.02)
            await eventually(lambda: len(app.predictions) == 30, 20, "the answers")
            await asyncio.sleep(2.5)  # past infer_retry_s: a request not completed would go again now
            assert app.predictions == Counter(range(30)) and not dev._requests.outstanding
            assert dev.counters["infer_resent"] == 0 and agent.counters["duplicates"] == 0
    finally:
        await asyncio.to_thread(dev.close, 5.0)
