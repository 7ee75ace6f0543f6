"""``features_batch`` at the edge: a real EdgeCore buffers exactly a batch's records, refuses bad batches whole,
de-duplicates by envelope ``n`` on the features stream, and replays a logged batch after a restart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from broker import topics
from broker.address import BrokerAddress
from broker.wire import ErrorReport, FeatureBatch, FeatureRecord, Kind, decode_envelope, encode_envelope
from device_sdk import DeviceClient
from edge_agent.checkpoints import build_trainer
from edge_agent.core import EdgeCore
from edge_agent.ingestlog import IngestLog
from tests.support.edge_testkit import edge_config, eventually, running, toy_profile

torch.set_num_threads(1)
DEV = "dev-1"
NOWHERE = BrokerAddress("127.0.0.1", 1)


def make_core(state: Path) -> EdgeCore:
    config = edge_config(state, NOWHERE, {"site": "s-batch", "edge_id": "e-batch",
                                          "limits": {"max_array_bytes": 4096}})
    core = EdgeCore(config, trainer=build_trainer(config))
    core.ingest(topics.device_up(core.site, DEV, topics.Uplink.REGISTER),
                encode_envelope(Kind.REGISTER, DEV, 1, toy_profile(DEV).to_body()))
    assert DEV in core.registry
    return core


@pytest.fixture
def core(tmp_path: Path) -> EdgeCore:
    return make_core(tmp_path / "state")


def batch_of(count: int, first: int = 0, *, seed: int = 0) -> FeatureBatch:
    rng = np.random.default_rng(seed)
    return FeatureBatch(DEV, first, count, {"imu": rng.standard_normal((count, 4, 6)).astype(np.float32),
                                            "env": rng.standard_normal((count, 8))},
                        labels=rng.integers(0, 2, count).astype("<i4"))


def send(core: EdgeCore, seq: int, body: dict, kind: Kind = Kind.FEATURES_BATCH):
    return core.ingest(topics.device_up(core.site, DEV, topics.Uplink.FEATURES), encode_envelope(kind, DEV, seq, body))


def buffered(core: EdgeCore) -> list:
    assert core.trainer is not None
    return core.trainer.buffer.snapshot()


def assert_buffer_holds(core: EdgeCore, batch: FeatureBatch) -> None:
    items = buffered(core)
    assert [i.label for i in items] == batch.labels.tolist()
    for name, stacked in batch.modalities.items():
        np.testing.assert_array_equal(np.stack([i.modalities[name] for i in items]), stacked.astype(np.float32))


def test_a_batch_is_buffered_record_by_record_in_one_step(core: EdgeCore) -> None:
    batch = batch_of(50)
    fx = send(core, 10, batch.to_body())
    assert fx.out == [] and fx.durable
    assert_buffer_holds(core, batch)
    assert core.counters["samples_total"] == 50 and core.counters["batches"] == 1
    assert core.registry.devices[DEV].counters["records"] == 50 and core.new_samples == 50
    assert core.modalities_seen == {"imu": 50, "env": 50}


def test_batches_and_single_records_share_one_guard_by_envelope_seq(core: EdgeCore) -> None:
    send(core, 10, batch_of(5).to_body())
    send(core, 10, batch_of(5, seed=1).to_body())  # a QoS 1 resend of the same n
    single = FeatureRecord(DEV, 99, {"env": np.zeros(8)}, label=1)
    send(core, 9, single.to_body(), Kind.FEATURES)  # a single record below the batch's n: same stream
    assert core.counters["duplicates"] == 2 and len(buffered(core)) == 5
    send(core, 11, single.to_body(), Kind.FEATURES)
    send(core, 12, batch_of(3, 100, seed=2).to_body())
    assert len(buffered(core)) == 9 and core.counters["samples_total"] == 9


def _bad(mutate) -> dict:
    body = batch_of(4).to_body()
    mutate(body)
    return body


def _replace_modality(name: str, array: np.ndarray):
    def mutate(body: dict) -> None:
        body["modalities"][name] = FeatureBatch(DEV, 0, len(array), {name: array}).to_body()["modalities"][name]
    return mutate


NAN = np.ones((4, 8))
NAN[2, 3] = np.nan

BAD = {
    "wrong stacked shape": (_replace_modality("imu", np.zeros((4, 4, 5), np.float32)), "ProfileMismatchError",
                            "profile_mismatch"),
    "count mismatch": (lambda b: b.update(count=5), "ArrayFormatError", "malformed"),
    "non-finite": (_replace_modality("env", NAN), "NonFiniteFeaturesError", "non_finite"),
    "beyond float32": (_replace_modality("env", np.full((4, 8), 1e300)), "NonFiniteFeaturesError", "non_finite"),
    "too many records": (lambda b: b.update(count=4097), "OversizeError", "malformed"),
    "oversized record": (_replace_modality("env", np.zeros((4, 600))), "OversizeError", "malformed"),
    "bad label": (lambda b: b.update(labels={"dtype": "<i4", "shape": [4], "data": bytes(12) + b"\x09\0\0\0"}),
                  "BadLabelError", "bad_label"),
    "labels not ints": (lambda b: b.update(labels={"dtype": "<f4", "shape": [4], "data": bytes(16)}),
                        "ArrayFormatError", "malformed"),
    "both id forms": (lambda b: b.update(samples={"dtype": "<u8", "shape": [4], "data": bytes(32)}),
                      "DecodeError", "malformed"),
    "unknown modality": (_replace_modality("gyro", np.zeros((4, 6), np.float32)), "ProfileMismatchError",
                         "profile_mismatch"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_malformed_batch_is_a_typed_counted_rejection_that_changes_nothing(core: EdgeCore, case: str) -> None:
    mutate, error, code = BAD[case]
    before = core.registry.to_dict()["guards"]
    fx = send(core, 20, _bad(mutate))
    assert core.counters[f"rejected.{error}"] == 1 and core.counters["samples_total"] == 0
    assert len(buffered(core)) == 0 and core.new_samples == 0 and core.registry.to_dict()["guards"] == before
    (out,) = fx.out
    report = ErrorReport.from_body(decode_envelope(out.payload).body)
    assert (report.code, report.ref) == (code, 20)
    good = batch_of(4)
    send(core, 20, good.to_body())  # the same n, now well formed: the refusal did not advance the guard
    assert_buffer_holds(core, good)


def test_a_logged_batch_is_replayed_once_after_a_restart(tmp_path: Path) -> None:
    """A batch logged but never acknowledged (kill -9 between log and ack): the restarted edge replays it from the
    ingest log as one batch, and the broker's redelivery of it is a duplicate."""
    first = make_core(tmp_path / "a")
    log = IngestLog(tmp_path / "ingest")
    topic = topics.device_up(first.site, DEV, topics.Uplink.REGISTER)
    log.append(topic, encode_envelope(Kind.REGISTER, DEV, 1, toy_profile(DEV).to_body()), False)
    batch = batch_of(30)
    payload = encode_envelope(Kind.FEATURES_BATCH, DEV, 7, batch.to_body())
    features = topics.device_up(first.site, DEV, topics.Uplink.FEATURES)
    assert first.ingest(features, payload).durable
    log.append(features, payload, False)
    log.commit()
    log.close()  # the process dies here, before acknowledging
    config = edge_config(tmp_path / "b", NOWHERE, {"site": "s-batch", "edge_id": "e-batch"})
    restarted = EdgeCore(config, trainer=build_trainer(config))
    frames = list(IngestLog(tmp_path / "ingest").replay(0))
    assert len(frames) == 2
    for t, p, retained in frames:
        restarted.ingest(t, p, retained=retained)
    assert_buffer_holds(restarted, batch)
    restarted.ingest(features, payload)  # the broker delivers the unacknowledged batch again
    assert len(buffered(restarted)) == 30 and restarted.counters["duplicates"] == 1
    assert restarted.counters["samples_total"] == 30


async def test_a_device_batch_reaches_a_running_agents_buffer(mosquitto_addr: BrokerAddress, tmp_path: Path) -> None:
    config = edge_config(tmp_path / "edge", mosquitto_addr, {"training": {"min_new_samples": 10_000}})
    rng = np.random.default_rng(3)
    recs = [FeatureRecord("gw", i, {"imu": rng.standard_normal((4, 6)).astype(np.float32),
                                    "env": rng.standard_normal(8).astype(np.float32)}, label=i % 2)
            for i in range(40)]
    async with running(config) as agent:
        dev = DeviceClient(config.site, "gw", mosquitto_addr, store_path=tmp_path / "gw.sqlite", linger_ms=50)
        try:
            assert dev.connect(10)
            dev.register(toy_profile("gw"))
            await eventually(lambda: "gw" in agent.core.registry, what="registration")
            dev.publish_many(recs[:25])
            for r in recs[25:]:
                dev.publish(r)  # lingered into a second batch
            assert dev.flush(10)
            await eventually(lambda: agent.counters["samples_total"] == 40, what="40 records")
        finally:
            dev.close(5)
        items = agent.trainer.buffer.snapshot()
        assert [i.label for i in items] == [r.label for r in recs]
        for name in ("imu", "env"):
            np.testing.assert_array_equal(np.stack([i.modalities[name] for i in items]),
                                          np.stack([r.modalities[name] for r in recs]))
        assert agent.counters["batches"] == 2
