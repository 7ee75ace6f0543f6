"""The edge's message handling without a broker: real envelopes in, what to send and what to schedule out.

A real (tiny) trainer backs the core; every payload is encoded the way a device or the cloud encodes it,
and every expectation is read back by decoding what the core returned.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from broker import topics
from broker.address import BrokerAddress
from broker.wire import (
    DeviceConfig,
    DeviceFeedback,
    ErrorReport,
    GlobalAdapter,
    Kind,
    SiteFeedback,
    decode_envelope,
    encode_envelope,
)
from edge_agent.checkpoints import build_trainer
from edge_agent.core import EdgeCore, Effects
from edge_agent.errors import BusyError
from edge_agent.training.toy_task import ToyTask
from megace_model.adapters import shared_state
from tests.support.edge_testkit import edge_config, record, toy_profile

torch.set_num_threads(1)

DEV = "dev-1"
NOWHERE = BrokerAddress("127.0.0.1", 1)  # never connected to: the core has no network


@pytest.fixture
def core(tmp_path: Path) -> EdgeCore:
    config = edge_config(tmp_path / "state", NOWHERE, {"training": {"min_new_samples": 5}})
    return EdgeCore(config, trainer=build_trainer(config))


def up(core: EdgeCore, device: str, what: topics.Uplink) -> str:
    return topics.device_up(core.site, device, what)


def register(core: EdgeCore, device: str = DEV, seq: int = 1) -> Effects:
    payload = encode_envelope(Kind.REGISTER, device, seq, toy_profile(device).to_body())
    return core.ingest(up(core, device, topics.Uplink.REGISTER), payload)


def features(core: EdgeCore, sample_id: int, sample: dict, device: str = DEV, *, label: bool = True) -> Effects:
    payload = encode_envelope(Kind.FEATURES, device, sample_id + 1, record(device, sample_id, sample, label=label)
                              .to_body())
    return core.ingest(up(core, device, topics.Uplink.FEATURES), payload)


def global_payload(core: EdgeCore, version: int, fill: float, *, rank: int = 8, alpha: float = 16.0) -> bytes:
    assert core.trainer is not None
    tensors = {k: np.full(tuple(v.shape), fill, np.float32) for k, v in shared_state(core.trainer.model).items()}
    glob = GlobalAdapter(version, core.trainer.fingerprint, "fedavg", rank, alpha, tensors)
    return encode_envelope(Kind.GLOBAL, "cloud", version, glob.to_body())


def test_a_registration_is_answered_with_a_config_on_the_devices_config_topic(core: EdgeCore) -> None:
    fx = register(core)
    assert len(fx.out) == 1 and not fx.applies and not fx.infers and not fx.train_due
    (msg,) = fx.out
    assert msg.topic == f"megace/v1/site/{core.site}/device/{DEV}/down/config"
    assert (msg.qos, msg.retain) == (1, False)
    env = decode_envelope(msg.payload)
    assert env.kind is Kind.CONFIG and env.sender == core.edge_id
    cfg = DeviceConfig.from_body(env.body)
    assert cfg.modalities == ["env", "imu"] and cfg.shapes == {"env": (8,), "imu": (4, 6)}
    assert cfg.model_version == 0
    assert core.counters["registrations"] == 1 and DEV in core.registry


def test_downlink_envelope_seqs_increase(core: EdgeCore) -> None:
    seqs = [decode_envelope(register(core, f"dev-{i}").out[0].payload).seq for i in range(3)]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3


def test_a_malformed_payload_is_answered_with_an_error_and_counted_without_changing_anything(core: EdgeCore) -> None:
    register(core)
    assert core.trainer is not None
    before = (core.state.global_version, core.state.upload_seq, len(core.trainer.buffer), core.new_samples)
    fx = core.ingest(up(core, DEV, topics.Uplink.FEATURES), b"\x93not msgpack")
    assert not fx.applies and not fx.infers and not fx.train_due
    (msg,) = fx.out
    assert msg.topic == f"megace/v1/site/{core.site}/device/{DEV}/down/error"
    env = decode_envelope(msg.payload)
    assert env.kind is Kind.ERROR
    report = ErrorReport.from_body(env.body)
    assert report.message.startswith("DecodeError")
    assert core.counters["rejected"] == 1 and core.counters["rejected.DecodeError"] == 1
    assert (core.state.global_version, core.state.upload_seq, len(core.trainer.buffer), core.new_samples) == before


def test_a_flood_of_bad_input_gets_a_burst_of_error_downlinks_then_only_counters(core: EdgeCore) -> None:
    """Before: one error downlink per bad message, so the edge's outbound traffic followed the sender's."""
    register(core)
    register(core, "dev-2")
    lim = core.config.limits
    t0 = time.monotonic()
    answered = sum(len(core.ingest(up(core, DEV, topics.Uplink.FEATURES), b"\x93junk").out) for _ in range(200))
    elapsed = time.monotonic() - t0
    # the burst, plus what the rate refilled meanwhile (at most one more token per 1/rate seconds)
    refilled = int(elapsed * lim.error_downlinks_per_s) + 1
    assert lim.error_downlink_burst <= answered <= lim.error_downlink_burst + refilled
    assert core.counters["errors_suppressed"] == 200 - answered
    assert core.counters["rejected.DecodeError"] == 200  # every one is still counted
    # the cap is per device: another device's first bad message is answered
    (msg,) = core.ingest(up(core, "dev-2", topics.Uplink.FEATURES), b"\x93junk").out
    assert msg.topic.endswith("/device/dev-2/down/error")
    # a shed inference request is always answered, flood or not
    busy = core.reject(BusyError("full"), DEV, 7)
    assert len(busy) == 1 and ErrorReport.from_body(decode_envelope(busy[0].payload).body).code == "busy"


def test_features_from_an_unregistered_device_are_refused(core: EdgeCore) -> None:
    sample = ToyTask(core.config.model, seed=1).samples(1)[0]
    fx = features(core, 0, sample)
    (msg,) = fx.out
    assert msg.topic.endswith(f"/device/{DEV}/down/error")
    assert ErrorReport.from_body(decode_envelope(msg.payload).body).message.startswith("UnregisteredDeviceError")
    assert core.counters["rejected.UnregisteredDeviceError"] == 1
    assert core.trainer is not None and len(core.trainer.buffer) == 0


def test_labelled_features_are_buffered_and_a_round_is_due_after_min_new_samples(core: EdgeCore) -> None:
    register(core)
    samples = ToyTask(core.config.model, seed=2).samples(5)
    due = [features(core, i, s).train_due for i, s in enumerate(samples)]
    assert due == [False, False, False, False, True]  # min_new_samples is 5
    assert core.trainer is not None and len(core.trainer.buffer) == 5
    assert core.counters["samples_total"] == 5 and core.new_samples == 5
    # the same seq again is a duplicate: nothing buffered, nothing sent
    fx = features(core, 4, samples[4])
    assert fx.out == [] and core.counters["duplicates"] == 1 and len(core.trainer.buffer) == 5
    # unlabelled records are accepted but not buffered
    fx = features(core, 10, samples[0], label=False)
    assert fx.out == [] and core.counters["unlabeled"] == 1 and len(core.trainer.buffer) == 5


def test_an_inference_request_becomes_work_to_schedule(core: EdgeCore) -> None:
    register(core)
    sample = ToyTask(core.config.model, seed=3).samples(1)[0]
    payload = encode_envelope(Kind.INFER, DEV, 7, record(DEV, 42, sample, label=False).to_body())
    fx = core.ingest(up(core, DEV, topics.Uplink.INFER), payload)
    assert fx.out == [] and len(fx.infers) == 1
    (request,) = fx.infers
    assert (request.device, request.sample_id, request.seq) == (DEV, 42, 7)
    assert set(request.sample["modalities"]) == set(sample["modalities"])


def test_a_newer_global_is_scheduled_and_an_older_one_than_installed_is_ignored(core: EdgeCore) -> None:
    assert core.trainer is not None
    fx = core.ingest(topics.global_down(), global_payload(core, 5, 0.01))
    assert fx.out == [] and [(j.source, j.version) for j in fx.applies] == [("global", 5)]
    assert core.apply("global", 5, fx.applies[0].tensors) is not None
    assert (core.state.global_version, core.state.global_source) == (5, "global")
    installed = {k: v.clone() for k, v in core.trainer.shared_state().items()}
    assert all(torch.allclose(v, torch.full_like(v, 0.01)) for v in installed.values())

    fx = core.ingest(topics.global_down(), global_payload(core, 3, 0.02))
    assert fx.out == [] and fx.applies == [] and core.counters["global_stale"] == 1
    # an older one that was already scheduled when the newer landed is refused at install time too
    assert core.apply("global", 4, {k: v.numpy() for k, v in installed.items()}) is None
    assert core.state.global_version == 5
    after = core.trainer.shared_state()
    assert all(torch.equal(installed[k], after[k]) for k in installed)
    assert core.counters["rejected"] == 0


def test_a_global_for_another_base_model_is_rejected_without_a_downlink(core: EdgeCore) -> None:
    tensors = {"x": np.zeros((1,), np.float32)}
    payload = encode_envelope(Kind.GLOBAL, "cloud", 1, GlobalAdapter(1, "0" * 64, "fedavg", 8, 16.0, tensors).to_body())
    fx = core.ingest(topics.global_down(), payload)
    assert fx.out == [] and fx.applies == []
    assert core.counters["rejected.BaseMismatchError"] == 1 and core.state.global_version == -1


def test_a_view_of_the_same_version_replaces_the_global(core: EdgeCore) -> None:
    assert core.trainer is not None
    tensors = {k: np.full(tuple(v.shape), 0.03, np.float32) for k, v in core.trainer.shared_state().items()}
    assert core.apply("global", 2, tensors) is not None
    assert core.apply("view", 2, tensors) is not None
    assert (core.state.global_version, core.state.global_source) == (2, "view")
    assert core.apply("global", 2, tensors) is None  # the view stays


def test_feedback_without_a_view_is_relayed_to_every_registered_device(core: EdgeCore) -> None:
    for dev in ("dev-a", "dev-b"):
        register(core, dev)
    body = SiteFeedback(site=core.site, version=9, rank=8, tensors={}, stats={"acc": 0.5}).to_body()
    fx = core.ingest(topics.site_feedback(core.site), encode_envelope(Kind.SITE_FEEDBACK, "cloud", 9, body))
    assert fx.applies == []
    assert sorted(m.topic for m in fx.out) == [f"megace/v1/site/{core.site}/device/{d}/down/feedback"
                                               for d in ("dev-a", "dev-b")]
    for msg in fx.out:
        fb = DeviceFeedback.from_body(decode_envelope(msg.payload).body)
        assert (fb.global_version, fb.metrics, fb.message) == (9, {"acc": 0.5}, "feedback")
    # another site's feedback is not for this edge
    other = SiteFeedback(site="elsewhere", version=10, rank=8, tensors={}, stats={}).to_body()
    fx = core.ingest(topics.site_feedback("elsewhere"), encode_envelope(Kind.SITE_FEEDBACK, "cloud", 10, other))
    assert fx.out == [] and fx.applies == []
