"""The edge core's less travelled paths, without a broker: wrong kinds, duplicates, ranks, scales, feedback.

Expectations are derived from the wire spec and the LoRA maths by hand, and read back by decoding
what the core returned.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from broker import topics
from broker.wire import (
    DeviceConfig,
    ErrorReport,
    Kind,
    Rejection,
    SiteFeedback,
    decode_envelope,
    encode_envelope,
)
from edge_agent.checkpoints import build_trainer
from edge_agent.core import EdgeCore
from edge_agent.training.toy_task import ToyTask
from tests.edge.test_edge_core import DEV, NOWHERE, features, global_payload, register, up
from tests.support.edge_testkit import edge_config, record, toy_profile

torch.set_num_threads(1)


def register_body(core: EdgeCore) -> dict:
    return toy_profile(DEV).to_body()


def make_core(tmp_path: Path, overrides: dict | None = None) -> EdgeCore:
    config = edge_config(tmp_path / "state", NOWHERE, {"training": {"min_new_samples": 5}, **(overrides or {})})
    return EdgeCore(config, trainer=build_trainer(config))


@pytest.fixture
def core(tmp_path: Path) -> EdgeCore:
    return make_core(tmp_path)


def error_of(core: EdgeCore, fx_out: list) -> tuple[str, ErrorReport, int]:
    (msg,) = fx_out
    env = decode_envelope(msg.payload)
    assert env.kind is Kind.ERROR and env.sender == core.edge_id
    return msg.topic, ErrorReport.from_body(env.body), env.seq


@pytest.mark.parametrize("what,kind", [
    (topics.Uplink.REGISTER, Kind.FEATURES), (topics.Uplink.FEATURES, Kind.INFER), (topics.Uplink.INFER, Kind.FEATURES),
])
def test_an_envelope_of_the_wrong_kind_on_a_device_topic_is_answered_with_its_seq(core: EdgeCore, what, kind) -> None:
    register(core)
    sample = ToyTask(core.config.model, seed=4).samples(1)[0]
    payload = encode_envelope(kind, DEV, 77, record(DEV, 1, sample).to_body())
    fx = core.ingest(up(core, DEV, what), payload)
    topic, report, _ = error_of(core, fx.out)
    assert topic.endswith(f"/device/{DEV}/down/error")
    assert report.ref == 77 and report.message.startswith("UnknownKindError")
    assert core.counters["rejected.UnknownKindError"] == 1
    assert core.trainer is not None and len(core.trainer.buffer) == 0 and not fx.infers


@pytest.mark.parametrize("channel", ["global", "feedback"])
def test_a_wrong_kind_on_a_cloud_topic_is_counted_and_answers_no_device(core: EdgeCore, channel: str) -> None:
    topic = topics.global_down() if channel == "global" else topics.site_feedback(core.site)
    fx = core.ingest(topic, encode_envelope(Kind.CONFIG, "cloud", 1, {}))
    assert fx.out == [] and fx.applies == []
    assert core.counters["rejected.UnknownKindError"] == 1 and core.state.global_version == -1


def test_a_long_error_message_is_cut_to_500_characters(core: EdgeCore) -> None:
    out = core.reject(ValueError("x" * 2000), DEV, 5)
    _, report, _ = error_of(core, out)
    assert len(report.message) == 500 and report.message.startswith("ValueError: xxx") and report.ref == 5
    assert core.reject(ValueError("no device"), None, None) == []
    assert core.counters["rejected"] == 2


def test_an_inference_from_an_unregistered_device_and_a_repeated_one_are_refused(core: EdgeCore) -> None:
    sample = ToyTask(core.config.model, seed=5).samples(1)[0]
    payload = encode_envelope(Kind.INFER, DEV, 3, record(DEV, 9, sample, label=False).to_body())
    fx = core.ingest(up(core, DEV, topics.Uplink.INFER), payload)
    assert error_of(core, fx.out)[1].message.startswith("UnregisteredDeviceError") and not fx.infers
    register(core)
    assert len(core.ingest(up(core, DEV, topics.Uplink.INFER), payload).infers) == 1
    again = core.ingest(up(core, DEV, topics.Uplink.INFER), payload)
    assert again.infers == [] and again.out == [] and core.counters["duplicates"] == 1


def test_modalities_seen_counts_each_buffered_sample_per_modality(core: EdgeCore) -> None:
    register(core)
    samples = ToyTask(core.config.model, seed=6).samples(3)
    for i, s in enumerate(samples):
        features(core, i, s)
    expected: dict[str, int] = {}
    for s in samples:
        for name in s["modalities"]:
            expected[name] = expected.get(name, 0) + 1
    assert core.modalities_seen == expected


def test_a_registration_reports_the_installed_global_version(core: EdgeCore) -> None:
    assert core.trainer is not None
    tensors = {k: np.full(tuple(v.shape), 0.01, np.float32) for k, v in core.trainer.shared_state().items()}
    assert core.apply("global", 4, tensors) is not None
    (msg,) = register(core).out
    assert DeviceConfig.from_body(decode_envelope(msg.payload).body).model_version == 4


def test_a_device_that_lost_its_sequence_numbers_is_accepted_again_after_a_live_registration(core: EdgeCore) -> None:
    register(core, seq=1)
    samples = ToyTask(core.config.model, seed=7).samples(3)
    features(core, 5, samples[0])  # seq 6
    assert core.counters["samples_total"] == 1
    # a retained replay of the old registration is not a restart: seq 2 stays below what was seen
    retained = encode_envelope(Kind.REGISTER, DEV, 1, register_body(core))
    core.ingest(up(core, DEV, topics.Uplink.REGISTER), retained, retained=True)
    features(core, 1, samples[1])  # seq 2
    assert core.counters["duplicates"] == 1 and core.counters["samples_total"] == 1
    # the device restarts from seq 1 and re-registers live: its guard restarts
    register(core, seq=1)
    features(core, 1, samples[1])  # seq 2 again, now fresh
    assert core.counters["samples_total"] == 2 and core.counters["duplicates"] == 1


def test_a_local_only_edge_ignores_globals_and_feedback(tmp_path: Path) -> None:
    core = make_core(tmp_path, {"training": {"min_new_samples": 5, "local_only": True}})
    fx = core.ingest(topics.global_down(), global_payload(core, 3, 0.01))
    body = SiteFeedback(site=core.site, version=3, rank=8, tensors={}, stats={}).to_body()
    fx2 = core.ingest(topics.site_feedback(core.site), encode_envelope(Kind.SITE_FEEDBACK, "cloud", 3, body))
    assert fx.applies == fx2.applies == [] and fx.out == fx2.out == []
    assert core.counters["global_ignored"] == 2 and core.state.global_version == -1


def test_a_global_of_another_rank_waits_for_the_sites_view(core: EdgeCore) -> None:
    assert core.trainer is not None
    fx = core.ingest(topics.global_down(), global_payload(core, 2, 0.01, rank=4))
    assert fx.applies == [] and fx.out == [] and core.counters["global_other_rank"] == 1


def test_a_global_made_at_another_alpha_has_its_b_factors_rescaled_and_a_untouched(core: EdgeCore) -> None:
    # the edge runs r=8, alpha=16 (scaling 2); a pair sent at alpha=32 (scaling 4) means the same
    # delta-W here only with B doubled: 4 * B @ A == 2 * (2B) @ A
    fx = core.ingest(topics.global_down(), global_payload(core, 2, 0.25, alpha=32.0))
    (job,) = fx.applies
    b_keys = [k for k in job.tensors if ".lora_B." in k]
    a_keys = [k for k in job.tensors if ".lora_A." in k]
    assert b_keys and a_keys
    assert all(np.allclose(job.tensors[k], 0.5) for k in b_keys)
    assert all(np.allclose(job.tensors[k], 0.25) for k in a_keys)
    same = core.ingest(topics.global_down(), global_payload(core, 3, 0.25, alpha=16.0)).applies[0]
    assert all(np.allclose(v, 0.25) for v in same.tensors.values())


def test_site_feedback_gives_upload_verdicts_and_schedules_a_view_of_this_rank(core: EdgeCore) -> None:
    assert core.trainer is not None
    tensors = {k: np.full(tuple(v.shape), 0.02, np.float32) for k, v in core.trainer.shared_state().items()}
    # seq 4 was refused once (budget full), then accepted on a resend: the acceptance is the verdict
    rejected = [Rejection(seq=2, reason="replayed"), Rejection(seq=3, reason="outlier"),
                Rejection(seq=4, reason="chunk_limit")]
    body = SiteFeedback(site=core.site, version=6, rank=8, tensors=tensors, stats={"acc": 0.75},
                        accepted=[1, 4], rejected=rejected).to_body()
    fx = core.ingest(topics.site_feedback(core.site), encode_envelope(Kind.SITE_FEEDBACK, "cloud", 6, body))
    assert sorted(fx.verdicts, key=lambda v: v[0]) == [(1, None), (2, "replayed"), (3, "outlier"), (4, None)]
    assert fx.out == []
    (job,) = fx.applies
    assert (job.source, job.version, job.stats) == ("view", 6, {"acc": 0.75})
    assert set(job.tensors) == set(tensors)
    # a view cut to another rank is not installable here: its stats are relayed instead
    register(core)
    other = SiteFeedback(site=core.site, version=7, rank=4, tensors=tensors, stats={}).to_body()
    fx = core.ingest(topics.site_feedback(core.site), encode_envelope(Kind.SITE_FEEDBACK, "cloud", 7, other))
    assert fx.applies == [] and [m.topic.rsplit("/", 1)[1] for m in fx.out] == ["feedback"]
    assert core.counters["feedback_relayed"] == 1


def test_a_prediction_goes_to_the_asking_device_with_the_model_version(core: EdgeCore) -> None:
    from broker.wire import Prediction
    from edge_agent.core import InferRequest

    request = InferRequest("dev-9", 31, {}, 0.0, seq=4)
    msg = core.prediction(request, 2, np.array([0.1, 0.2, 0.7], np.float32), 6)
    assert msg.topic == f"megace/v1/site/{core.site}/device/dev-9/down/prediction"
    env = decode_envelope(msg.payload)
    assert env.kind is Kind.PREDICTION and env.sender == core.edge_id
    got = Prediction.from_body(env.body)
    assert (got.device, got.sample, got.label, got.model_version) == ("dev-9", 31, 2, 6)
    assert np.allclose(got.probs, [0.1, 0.2, 0.7]) and core.counters["predictions"] == 1


def _personal(core: EdgeCore, fill: float) -> dict[str, np.ndarray]:
    from megace_common.lora import add_peft_prefix

    assert core.trainer is not None
    return {add_peft_prefix(k): np.full(tuple(v.shape), fill, np.float32)
            for k, v in core.trainer.personal_state().items()}


def test_personal_tensors_from_the_cloud_install_only_when_shared_and_well_formed(tmp_path: Path) -> None:
    from megace_model.errors import AdapterMismatchError, NonFiniteAdapterError

    core = make_core(tmp_path, {"training": {"min_new_samples": 5, "share_personal": True}})
    assert core.trainer is not None
    shared = {k: np.full(tuple(v.shape), 0.01, np.float32) for k, v in core.trainer.shared_state().items()}
    personal = _personal(core, 0.5)
    before = {k: v.clone() for k, v in core.trainer.personal_state().items()}

    missing = dict(list(personal.items())[1:])
    with pytest.raises(AdapterMismatchError, match="differ"):
        core.apply("global", 1, {**shared, **missing})
    name = next(iter(personal))
    wrong_shape = {**personal, name: np.zeros((1, 1), np.float32)}
    with pytest.raises(AdapterMismatchError, match="shape"):
        core.apply("global", 1, {**shared, **wrong_shape})
    not_finite = {**personal, name: np.full(personal[name].shape, np.nan, np.float32)}
    with pytest.raises(NonFiniteAdapterError):
        core.apply("global", 1, {**shared, **not_finite})
    after_refusals = core.trainer.personal_state()
    assert all(torch.equal(before[k], after_refusals[k]) for k in before) and core.state.global_version == -1

    out = core.apply("global", 1, {**shared, **personal})
    assert out is not None and core.state.global_version == 1
    installed = core.trainer.personal_state()
    assert all(torch.allclose(v, torch.full_like(v, 0.5)) for v in installed.values())


def test_with_defer_global_the_fleets_personal_part_waits_for_the_next_round(tmp_path: Path) -> None:
    """``share_personal`` + ``defer_global``: the site keeps serving its own body under its own adapter; the
    fleet's whole model (adapter and body) starts the next round."""
    core = make_core(tmp_path, {"training": {"min_new_samples": 5, "share_personal": True, "defer_global": True}})
    assert core.trainer is not None
    for sample in ToyTask(core.config.model, seed=4).samples(12):
        core.trainer.add_sample(sample)
    shared = {k: np.full(tuple(v.shape), 0.01, np.float32) for k, v in core.trainer.shared_state().items()}
    served_lora, served_body = core.trainer.shared_state(), core.trainer.personal_state()
    assert core.apply("global", 1, {**shared, **_personal(core, 0.5)}) is not None
    assert core.state.global_version == 1
    assert all(torch.equal(served_body[k], v) for k, v in core.trainer.personal_state().items())
    assert all(torch.equal(served_lora[k], v) for k, v in core.trainer.shared_state().items())
    core.trainer.train_round(steps=0)
    assert all(torch.allclose(v, torch.full_like(v, 0.5)) for v in core.trainer.personal_state().values())
    assert all(torch.allclose(v, torch.full_like(v, 0.01)) for v in core.trainer.shared_state().values())


def test_personal_tensors_are_ignored_unless_the_edge_shares_its_personal_part(core: EdgeCore) -> None:
    assert core.trainer is not None
    shared = {k: np.full(tuple(v.shape), 0.01, np.float32) for k, v in core.trainer.shared_state().items()}
    before = {k: v.clone() for k, v in core.trainer.personal_state().items()}
    assert core.apply("global", 1, {**shared, **_personal(core, 0.5)}) is not None
    after = core.trainer.personal_state()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_with_an_epoch_only_a_new_sequence_store_restarts_a_devices_seqs(core: EdgeCore) -> None:
    """A redelivered (or re-sent) old registration is not a restart; a registration from a new store is."""
    samples = ToyTask(core.config.model, seed=9).samples(3)

    def reg(seq: int, epoch: int) -> None:
        profile = toy_profile(DEV)
        profile.epoch = epoch
        core.ingest(up(core, DEV, topics.Uplink.REGISTER), encode_envelope(Kind.REGISTER, DEV, seq, profile.to_body()))

    reg(1, epoch=111)
    features(core, 5, samples[0])  # seq 6
    reg(1, epoch=111)  # the broker redelivers the old registration, live: same store
    features(core, 5, samples[0])  # seq 6 again: a duplicate, not a new record
    assert core.counters["duplicates"] == 1 and core.counters["samples_total"] == 1
    reg(1, epoch=222)  # a new store (the gateway was wiped): its seqs start over
    features(core, 0, samples[1])  # seq 1
    assert core.counters["samples_total"] == 2 and core.counters["duplicates"] == 1
