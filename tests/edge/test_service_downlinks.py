"""A burst of downlinks waits in the edge's own bounded queue, not inside paho, and every reply arrives.

Before: the downlink window (64) was above paho's in-flight limit (20) and aiomqtt's warning threshold
(10), so bursts logged "There are N pending publish calls" and queued inside the MQTT client.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
import torch

from broker.wire import Kind
from edge_agent.training.toy_task import ToyTask
from tests.support.edge_testkit import Device, edge_config, eventually, record, running, uid

torch.set_num_threads(1)
REQUESTS = 300


async def test_a_burst_of_predictions_is_answered_without_piling_up_in_the_mqtt_client(
    mosquitto_addr, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    # an inference queue above the burst: every request is answered with a prediction, none shed as busy
    config = edge_config(tmp_path / "state", mosquitto_addr, {"limits": {"downlink_window": 16, "infer_queue": 1024}})
    task = ToyTask(config.model, seed=5)
    samples = task.samples(REQUESTS)
    async with running(config) as agent:
        client = agent._client
        assert client is not None
        # the MQTT client's own limits follow the edge's window: paho's in-flight cap and aiomqtt's warning
        assert client._client.max_inflight_messages == 16 and client.pending_calls_threshold > 16
        dev = await Device(config.site, uid("dev"), mosquitto_addr, tmp_path).start()
        try:
            await eventually(lambda: dev.received(Kind.CONFIG), what="device config")

            def burst() -> None:
                for i, s in enumerate(samples):
                    dev.client.request_inference(record(dev.id, i, s, label=False))

            await asyncio.to_thread(burst)
            await eventually(lambda: len(dev.received(Kind.PREDICTION)) >= REQUESTS, 60, "every prediction")
            answered = sorted(int(p.sample) for p in dev.received(Kind.PREDICTION))
            assert answered == list(range(REQUESTS))
            assert agent.counters["downlink_dropped"] == 0
        finally:
            await dev.close()
    piled = [r.getMessage() for r in caplog.records if "pending publish calls" in r.getMessage()]
    assert piled == []
