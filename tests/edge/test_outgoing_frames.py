"""The edge's downlink writer on its own (no broker): seqs, the persisted seq bound, signing and chunking.

Why: a device drops a downlink whose seq it has seen (a redelivery), so the writer's seqs must keep increasing,
across restarts too (the bound persisted before use), and a chunked model must reassemble into the very envelope
the edge signed. Expectations are worked out from the documented rules (first seq 1; a bound of
``DOWN_SEQ_BLOCK`` seqs persisted before the first seq above the last one; SPEC §4 chunk topics) and read back with
the device's own tools (envelope decoding, the reassembler, the verifier).
"""

from __future__ import annotations

import numpy as np
import pytest

from broker import topics
from broker.chunking import Reassembler
from broker.signing import Signer, Verifier, generate_private_key
from broker.wire import Kind, Prediction, decode_envelope
from edge_agent.outgoing import DOWN_SEQ_BLOCK, DownlinkWriter, Outgoing

SITE, EDGE, DEV = "s1", "edge-1", "d1"


def _prediction(sample: int, n: int = 4) -> Prediction:
    return Prediction(DEV, sample, 1, np.linspace(0.0, 1.0, n, dtype=np.float32))


def _seq_and_sender(out: Outgoing, verifier: Verifier | None = None) -> tuple[int, str]:
    env = decode_envelope(out.payload if verifier is None else verifier.open(out.payload))
    return env.seq, env.sender


def test_seqs_start_at_one_and_increase_and_the_topic_is_the_devices_downlink() -> None:
    writer = DownlinkWriter(SITE, EDGE, None, 1 << 20)
    outs = [writer.device(DEV, Kind.PREDICTION, _prediction(i)) for i in range(3)]
    assert [_seq_and_sender(o) for o in outs] == [(1, EDGE), (2, EDGE), (3, EDGE)]
    assert {o.topic for o in outs} == {f"megace/v1/site/{SITE}/device/{DEV}/down/prediction"}
    assert (outs[0].qos, outs[0].retain, outs[0].done) == (1, False, None)
    assert Prediction.from_body(decode_envelope(outs[2].payload).body).sample == 2
    assert writer.seq == 3


def test_a_resumed_writer_persists_a_block_bound_before_using_a_seq_above_the_last() -> None:
    reserved: list[int] = []
    writer = DownlinkWriter(SITE, EDGE, None, 1 << 20)
    writer.resume(500, reserved.append)  # the bound the last run persisted
    assert reserved == []  # nothing used yet: nothing to persist
    first = writer.device(DEV, Kind.PREDICTION, _prediction(1))
    assert _seq_and_sender(first)[0] == 501 and reserved == [501 + DOWN_SEQ_BLOCK - 1]
    for _ in range(DOWN_SEQ_BLOCK - 1):  # the rest of the block needs no write
        writer.signed("t", Kind.PREDICTION, _prediction(1))
    assert writer.seq == 500 + DOWN_SEQ_BLOCK and reserved == [500 + DOWN_SEQ_BLOCK]
    writer.signed("t", Kind.PREDICTION, _prediction(1))  # the first seq past the bound: the next block
    assert reserved == [500 + DOWN_SEQ_BLOCK, 500 + 2 * DOWN_SEQ_BLOCK]


def test_resume_never_moves_the_seq_back() -> None:
    """A bound read after some seqs were used (the inference workers' writer) must not hand one out again."""
    reserved: list[int] = []
    writer = DownlinkWriter(SITE, EDGE, None, 1 << 20)
    for _ in range(7):
        writer.signed("t", Kind.PREDICTION, _prediction(1))
    writer.resume(3, reserved.append)
    out = writer.signed("t", Kind.PREDICTION, _prediction(1))
    assert _seq_and_sender(out)[0] == 8 and reserved == [8 + DOWN_SEQ_BLOCK - 1]


def test_a_signing_writer_signs_the_whole_envelope() -> None:
    signer = Signer(generate_private_key())
    writer = DownlinkWriter(SITE, EDGE, signer, 1 << 20)
    out = writer.device(DEV, Kind.PREDICTION, _prediction(9))
    assert _seq_and_sender(out, Verifier([signer.public_key])) == (1, EDGE)


@pytest.mark.parametrize("own_limit", [False, True])
def test_a_message_over_the_packet_limit_goes_as_chunks_that_reassemble_into_the_signed_envelope(
        own_limit: bool) -> None:
    signer = Signer(generate_private_key())
    verifier = Verifier([signer.public_key])
    big = _prediction(42, n=2000)  # about 8 KB of probabilities
    limit = 1500
    writer = DownlinkWriter(SITE, EDGE, signer, 1 << 20 if own_limit else limit)
    writer.signed("t", Kind.PREDICTION, _prediction(1))  # seq 1: the chunks must carry the message's seq, 2
    parts = writer.frames(DEV, Kind.PREDICTION, big, limit) if own_limit else writer.frames(DEV, Kind.PREDICTION, big)
    topic = f"megace/v1/site/{SITE}/device/{DEV}/down/prediction"
    assert len(parts) >= 6  # 8 KB in chunks of under 1.5 KB
    assert [p.topic for p in parts] == [topics.chunk(topic, i) for i in range(len(parts))]
    assert all(len(p.payload) <= limit and (p.qos, p.retain, p.done) == (1, False, None) for p in parts)
    chunk_envs = [decode_envelope(p.payload) for p in parts]
    assert {(e.kind, e.sender, e.seq) for e in chunk_envs} == {(Kind.CHUNK, EDGE, 2)}
    reassembler = Reassembler()
    wholes = [reassembler.feed(topic, e.body) for e in chunk_envs]
    assert wholes[:-1] == [None] * (len(parts) - 1) and wholes[-1] is not None
    env = decode_envelope(verifier.open(wholes[-1]))
    assert (env.kind, env.sender, env.seq) == (Kind.PREDICTION, EDGE, 2)
    got = Prediction.from_body(env.body)
    assert got.sample == 42 and np.array_equal(got.probs, big.probs)
    assert writer.seq == 2


def test_a_message_that_fits_goes_whole_under_the_default_limit() -> None:
    writer = DownlinkWriter(SITE, EDGE, None, 1 << 20)
    (out,) = writer.frames(DEV, Kind.PREDICTION, _prediction(5, n=2000))
    assert out.topic.endswith("/down/prediction") and _seq_and_sender(out) == (1, EDGE)
