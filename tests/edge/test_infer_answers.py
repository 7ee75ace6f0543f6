"""Repeated inference requests at the edge core, without a broker: a lost request re-sent below the mark is served,
a repeat of an answered one gets the very same answer bytes, one whose answer is gone is answered afresh.

The core is the inference workers' kind (``EdgeCore`` without a trainer) and the edge's (with one): both answer the
same way. Answers are read back by decoding what the core returned.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from broker import topics
from broker.wire import CapabilityProfile, ErrorReport, Kind, Prediction, decode_envelope, encode_envelope
from edge_agent.answers import AnswerBook
from edge_agent.checkpoints import build_trainer
from edge_agent.core import EdgeCore, Effects
from edge_agent.errors import BusyError
from edge_agent.outgoing import Outgoing
from edge_agent.serving import InferenceServer
from edge_agent.training.toy_task import ToyTask
from tests.edge.test_edge_core import DEV, NOWHERE, register, up
from tests.support.edge_testkit import edge_config, record, toy_profile


@pytest.fixture(params=["worker", "edge"])
def core(request: pytest.FixtureRequest, tmp_path: Path) -> EdgeCore:
    config = edge_config(tmp_path / "state", NOWHERE, {"training": {"min_new_samples": 1000}})
    return EdgeCore(config) if request.param == "worker" else EdgeCore(config, trainer=build_trainer(config))


SAMPLE = ToyTask(edge_config(Path("/nonexistent"), NOWHERE).model, seed=3).samples(1)[0]


def ask(core: EdgeCore, seq: int, sample_id: int | None = None) -> Effects:
    """The device's inference request ``seq`` (sample id ``seq + 100`` unless given), as the SDK sends it."""
    body = record(DEV, seq + 100 if sample_id is None else sample_id, SAMPLE, label=False).to_body()
    return core.ingest(up(core, DEV, topics.Uplink.INFER), encode_envelope(Kind.INFER, DEV, seq, body))


def answer(core: EdgeCore, fx: Effects, label: int = 1) -> Outgoing:
    """What the serving loop does with an accepted request: predict (here: a fixed label) and answer."""
    (request,) = fx.infers
    return core.prediction(request, label, np.array([0.25, 0.75], np.float32), 0)


def prediction_of(out: Outgoing) -> tuple[int, str, Prediction]:
    env = decode_envelope(out.payload)
    assert env.kind is Kind.PREDICTION and out.topic.endswith(f"/device/{DEV}/down/prediction")
    return env.seq, env.sender, Prediction.from_body(env.body)


def test_a_lost_request_resent_below_a_later_one_is_served_once(core: EdgeCore) -> None:
    register(core)
    assert [r.seq for r in ask(core, 10).infers] == [10]
    assert [r.seq for r in ask(core, 12).infers] == [12]  # 11 was lost by the broker: a gap
    fill = ask(core, 11)  # re-sent, below the mark (a high-water mark alone dropped it: never answered)
    assert [(r.seq, r.sample_id) for r in fill.infers] == [(11, 111)] and fill.out == []
    assert core.registry.guards["infer"].fills == 1
    _, _, pred = prediction_of(answer(core, fill))
    assert (pred.device, pred.sample) == (DEV, 111)
    again = ask(core, 11)  # the same request once more: its answer is kept, no second inference
    assert again.infers == [] and len(again.out) == 1


def test_a_repeat_of_an_answered_request_gets_the_same_answer_bytes(core: EdgeCore) -> None:
    register(core)
    first = ask(core, 20)
    pending = ask(core, 20)  # repeated before the answer: it is on its way, nothing more
    assert pending.infers == [] and pending.out == [] and core.counters["infer_repeats_pending"] == 1
    sent = answer(core, first, label=1)
    other = answer(core, ask(core, 21), label=0)  # a later answer moves the edge's downlink seq on
    repeat = ask(core, 20)
    assert repeat.infers == []
    (again,) = repeat.out
    assert (again.topic, again.payload) == (sent.topic, sent.payload)  # same sender and seq: a device drops it
    assert again.done is None
    assert decode_envelope(other.payload).seq > decode_envelope(sent.payload).seq
    assert core.counters["infer_repeats_answered"] == 1 and core.counters["predictions"] == 2


def test_a_repeat_whose_answer_was_evicted_is_answered_afresh(core: EdgeCore) -> None:
    core.answers = AnswerBook(core.counters, capacity=2)
    register(core)
    sent = answer(core, ask(core, 30))
    answer(core, ask(core, 31))
    answer(core, ask(core, 32))  # capacity 2: the answer to 30 is forgotten
    fresh = ask(core, 30)
    assert [(r.seq, r.sample_id) for r in fresh.infers] == [(30, 130)] and fresh.out == []
    assert core.counters["infer_repeats_fresh"] == 1
    new = answer(core, fresh)
    assert decode_envelope(new.payload).seq > decode_envelope(sent.payload).seq  # a new answer, same prediction
    assert prediction_of(new)[2].sample == prediction_of(sent)[2].sample == 130


def test_a_device_with_a_new_sequence_store_never_gets_an_old_answer(core: EdgeCore) -> None:
    """A restarted device may reuse a seq for another request: the kept answer must not answer it."""
    core.ingest(up(core, DEV, topics.Uplink.REGISTER), encode_envelope(Kind.REGISTER, DEV, 1, _profile(7).to_body()))
    answer(core, ask(core, 40, sample_id=1))
    core.ingest(up(core, DEV, topics.Uplink.REGISTER), encode_envelope(Kind.REGISTER, DEV, 1, _profile(8).to_body()))
    fx = ask(core, 40, sample_id=2)  # same seq, another store epoch: a new request
    assert [(r.seq, r.sample_id) for r in fx.infers] == [(40, 2)] and fx.out == []


def _profile(epoch: int) -> CapabilityProfile:
    return replace(toy_profile(DEV), epoch=epoch)


def test_an_error_answer_carries_the_request_seq_and_is_kept_for_a_repeat(core: EdgeCore) -> None:
    """A request the serving queue refused (busy) is answered with ``ref`` = its seq, so the device can tell which
    request it answers; a repeat gets that same error again."""
    register(core)
    emitted: list[Outgoing] = []
    server = InferenceServer(core, emitted.extend, queue=1, batch=1)
    (request,) = ask(core, 50).infers
    (out,) = server.refused(BusyError("full"), request)
    env = decode_envelope(out.payload)
    report = ErrorReport.from_body(env.body)
    assert env.kind is Kind.ERROR and report.ref == 50 and report.code == "busy"
    repeat = ask(core, 50)
    assert repeat.infers == [] and [o.payload for o in repeat.out] == [out.payload]
