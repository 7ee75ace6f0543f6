"""Only the bytes that are needed: acknowledgements carry no tensors, a site's view travels only where it is not a
cut of the global every edge receives anyway, and a round moves at most 3N+1 adapter copies through the broker.

The real ``AggregatorCore`` is driven with real upload bytes; copies are counted the publish/subscribe way (a
publish counts once in, each delivery once out: the global reaches all N edges, a site feedback its one edge).
Cuts are checked against ``tests.support.np_reference`` (numpy slicing), never against ``megace_common.views``.
"""

from __future__ import annotations

import functools
import zlib
from pathlib import Path

import numpy as np
import pytest

from broker import topics
from broker.address import BrokerAddress
from broker.errors import DecodeError, WireError
from broker.wire import AdapterUpdate, GlobalAdapter, SiteFeedback, decode_envelope
from broker.wire.bodies import FeedbackView, decode_body
from cloud_aggregator.core import AggregatorCore
from cloud_aggregator.messages import Outgoing
from cloud_aggregator.strategies import STRATEGIES, get_strategy
from megace_model.adapters import build_edge_model, shared_state
from megace_model.fingerprint import base_fingerprint
from tests.support import np_reference as ref
from tests.support.cloud_bus import cloud_config, model_config, perturbed, update_payload
from tests.support.cloud_testkit import make_contribution

ADDR = BrokerAddress("127.0.0.1", 1)  # the core never connects
BOTH = {"audio": 8, "image": 8}
RANKS = (8, 4, 2)


@functools.cache
def base_adapter(rank: int) -> dict[str, np.ndarray]:
    return {n: t.numpy().copy() for n, t in shared_state(build_edge_model(model_config(rank))).items()}


def upload(site: str, seq: int, rank: int, base: int = 0, modalities: dict[str, int] | None = None) -> bytes:
    tensors = perturbed(base_adapter(rank), seed=zlib.crc32(f"{site}/{seq}".encode()), scale=0.05)
    return update_payload(tensors, site=site, seq=seq, base_version=base, fingerprint=base_fingerprint(model_config()),
                          rank=rank, samples=8, modalities=modalities or BOTH)


def body(o: Outgoing) -> object:
    return decode_body(decode_envelope(o.payload))


def view_of(o: Outgoing) -> FeedbackView:
    return FeedbackView.of(decode_envelope(o.payload).body)


def tensor_bytes(o: Outgoing) -> int:
    """Adapter bytes in one message (0 for metrics)."""
    if "/metrics/" in o.topic or "/events/" in o.topic:
        return 0
    b = body(o)
    return sum(int(np.asarray(t).nbytes) for t in b.tensors.values()) if hasattr(b, "tensors") else 0


def copies(o: Outgoing, n_edges: int) -> int:
    """Publish in + deliveries out: the global goes to every edge, an upload or a site feedback to one receiver."""
    return 1 + n_edges if o.topic == topics.global_down() else 2


def run_round(core: AggregatorCore, ranks: tuple[int, ...], seq: int) -> tuple[list[Outgoing], int]:
    """Every site uploads once (buffer_k = N: the last upload aggregates); returns the cloud's messages and the
    upload bytes that crossed the broker."""
    out, up = [], 0
    for i, r in enumerate(ranks):
        payload = upload(f"s{i}", seq, r, base=core.version)
        update = decode_body(decode_envelope(payload))
        assert isinstance(update, AdapterUpdate)
        up += 2 * sum(int(t.nbytes) for t in update.tensors.values())
        out += core.ingest(topics.adapter_up(f"s{i}"), payload)
    return out, up


@pytest.mark.parametrize("strategy,mode", [("fedavg", "global"), ("flora", "none")])
def test_an_acknowledgement_carries_no_tensors(tmp_path: Path, strategy: str, mode: str) -> None:
    """Accepted or refused, the answer to an upload is verdicts, version and statistics; where the site's view is a
    cut of the global it names the cut (and stays retained), otherwise it names none (and is not retained)."""
    core = AggregatorCore(cloud_config(tmp_path / "c", ADDR, aggregation={"strategy": strategy, "buffer_k": 10}))
    try:
        [ack] = core.ingest(topics.adapter_up("a"), upload("a", 1, 4))
        [again] = core.ingest(topics.adapter_up("a"), upload("a", 1, 4))  # a resend: refused as a duplicate
        for o, want in ((ack, ([1], [])), (again, ([1], ["duplicate"]))):
            fb = body(o)
            assert isinstance(fb, SiteFeedback) and fb.tensors == {} and tensor_bytes(o) == 0
            assert (fb.accepted, [r.reason for r in fb.rejected]) == want and fb.version == 0 and fb.rank == 4
            assert view_of(o).mode == mode and o.retain is (mode == "global")
        if mode == "global":
            assert view_of(ack) == FeedbackView("global", None, "AB")  # fedavg: every modality, both factors
    finally:
        core.close()


def test_the_old_traffic_is_one_switch_away(tmp_path: Path) -> None:
    """``feedback_tensors = "always"``: every feedback carries the whole view, acknowledgements too (old edges)."""
    cfg = cloud_config(tmp_path / "c", ADDR, aggregation={"buffer_k": 10, "feedback_tensors": "always"})
    core = AggregatorCore(cfg)
    try:
        [ack] = core.ingest(topics.adapter_up("a"), upload("a", 1, 4))
        assert view_of(ack).mode == "tensors" and ack.retain
        assert tensor_bytes(ack) == sum(int(v.nbytes) for v in base_adapter(4).values())
    finally:
        core.close()


@pytest.mark.parametrize("n", [3, 10])
def test_a_round_moves_at_most_3n_plus_1_adapter_copies(tmp_path: Path, n: int) -> None:
    """Mixed ranks 8/4/2: each edge receives tensors at most once per round (the global), and the adapter bytes
    through the broker are the uploads (in and out) plus the global (in, and out to N): within (3N+1) x the
    full-rank adapter. The old traffic added each site's view four times: with its acknowledgement and after the
    aggregation, each in and out of the broker."""
    ranks = tuple(RANKS[i % 3] for i in range(n))
    full = sum(int(v.nbytes) for v in base_adapter(8).values())
    totals, uploads = {}, {}
    for feedback_tensors in ("needed", "always"):
        cfg = cloud_config(tmp_path / feedback_tensors, ADDR,
                           aggregation={"buffer_k": n, "feedback_tensors": feedback_tensors})
        core = AggregatorCore(cfg)
        try:
            core.announce()
            for seq in (1, 2):
                out, up = run_round(core, ranks, seq)
                assert core.version == seq
                totals[feedback_tensors] = up + sum(tensor_bytes(o) * copies(o, n) for o in out)
                uploads[feedback_tensors] = up
                [g] = [body(o) for o in out if o.topic == topics.global_down()]
                assert isinstance(g, GlobalAdapter) and sum(int(t.nbytes) for t in g.tensors.values()) == full
                if feedback_tensors == "needed":  # per receiver: the global is the only adapter it is sent
                    assert all(tensor_bytes(o) == 0 for o in out if o.topic != topics.global_down())
        finally:
            core.close()
    assert uploads["needed"] == uploads["always"] == sum(2 * full * r // 8 for r in ranks)
    assert totals["needed"] == uploads["needed"] + (n + 1) * full <= (3 * n + 1) * full
    assert totals["always"] == totals["needed"] + sum(4 * full * r // 8 for r in ranks)


def test_a_view_that_is_not_a_cut_is_still_sent(tmp_path: Path) -> None:
    """FLoRA's stacked global: each site's view (an SVD fit of its rank) differs from any slice, so it is sent,
    retained, as tensors after the aggregation; the acknowledgements before carried none."""
    core = AggregatorCore(cloud_config(tmp_path / "c", ADDR, aggregation={"strategy": "flora", "buffer_k": 3}))
    try:
        out, _ = run_round(core, RANKS, 1)
        assert core.version == 1
        views = [o for o in out if o.topic.endswith("/feedback") and o.retain]
        assert sorted(o.topic for o in views) == [topics.site_feedback(f"s{i}") for i in range(3)]
        for o in views:
            fb = body(o)
            assert view_of(o).mode == "tensors" and isinstance(fb, SiteFeedback)
            a = [t for n, t in fb.tensors.items() if ".lora_A." in n]
            assert a and all(t.shape[0] == fb.rank for t in a)
        acks = [o for o in out if o.topic.endswith("/feedback") and not o.retain]
        assert len(acks) == 3 and all(tensor_bytes(o) == 0 and view_of(o).mode == "none" for o in acks)
    finally:
        core.close()


def test_a_restart_announces_every_sites_view(tmp_path: Path) -> None:
    """After a crash the cloud re-publishes the global and, retained, each known site's view of it (a cut)."""
    cfg = cloud_config(tmp_path / "c", ADDR, aggregation={"strategy": "modality-aware", "buffer_k": 3})
    core = AggregatorCore(cfg)
    try:
        run_round(core, RANKS, 1)
    finally:
        core.close()
    core = AggregatorCore(cfg)
    try:
        out = core.announce()
        assert [o.topic for o in out] == [topics.global_down(), *(topics.site_feedback(f"s{i}") for i in range(3))]
        for o in out[1:]:
            fb = body(o)
            assert isinstance(fb, SiteFeedback) and fb.version == 1 and o.retain and fb.tensors == {}
            assert view_of(o) == FeedbackView("global", ("audio", "image"), "AB")
    finally:
        core.close()


def _numpy_cut(g: dict[str, np.ndarray], rank: int, scaling: float, view: FeedbackView) -> dict[str, np.ndarray]:
    """The cut a feedback names, by the documented rule (np_reference slicing), from the global's tensors."""
    out = {}
    for n, t in g.items():
        mod, parts = ref.modality(n), ref.split(n)
        if mod is not None and view.modalities is not None and mod not in view.modalities:
            continue
        if parts is None:
            out[n] = t
        elif parts[1] in view.factors:
            cut = ref.fit_rank(t, parts[1], rank)
            out[n] = cut / scaling if parts[1] == "B" else cut
    return out


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_rule_that_names_a_cut_gives_exactly_that_cut(name: str) -> None:
    """For each rule, an edge's view is what its cut says (or the rule says it is no cut: flora's stacks)."""
    mods = {"x.modality_proj.audio": (6, 5), "x.modality_proj.image": (6, 4), "x.enc": (6, 6)}
    cs = [make_contribution(i, r, mods, samples=10 + i, modalities={"audio": i, "image": 1}, alpha=2.0 * r)
          for i, r in enumerate((4, 3, 2))]
    s = get_strategy(name, inner="fedavg") if name in ("modality-aware", "norm-clip") else get_strategy(name)
    g = s.aggregate(None, cs)
    for rank, alpha, seen in ((2, 4.0, {"audio": 0, "image": 3}), (6, 6.0, {"audio": 2, "image": 2})):
        cut = s.cut_for(g, rank, seen, alpha)
        view = s.view_for(g, rank, seen, alpha)
        if cut is None:
            assert name == "flora"
            m = "x.enc"
            assert not np.allclose(view[f"{m}.lora_A.weight"], ref.fit_rank(g.tensors[f"{m}.lora_A.weight"],
                                                                             "A", rank))
            continue
        wire = cut.to_wire()
        want = _numpy_cut(g.tensors, rank, alpha / rank, wire)
        assert sorted(view) == sorted(want), name
        for n in want:
            np.testing.assert_array_equal(view[n], want[n], err_msg=f"{name} {n}")
        if name == "modality-aware":
            assert wire.modalities == (("image",) if seen["audio"] == 0 else ("audio", "image"))
        assert wire.factors == ("A" if name == "fedsa" else "AB")


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"view": "sliced"}, "unknown view 'sliced'"),
        ({"view": 1}, "field 'view' has the wrong type int"),
        ({"view": "global"}, "cut body must be a map"),
        ({"view": "global", "cut": {"factors": "BA"}}, "cut factors must be one of"),
        ({"view": "global", "cut": {}}, "missing field 'factors'"),
        ({"view": "global", "cut": {"factors": "AB", "modalities": ["Audio"]}}, "malformed modality name"),
        ({"view": "global", "cut": {"factors": "AB"}, "tensors": {"t": {"dtype": "<f4", "shape": [1],
                                                                       "data": b"\0" * 4}}}, "carries no tensors"),
    ],
)
def test_the_view_fields_are_checked_on_the_way_in(fields: dict, error: str) -> None:
    b = {**SiteFeedback("s", 1, 2, {}).to_body(), **fields}
    with pytest.raises(WireError, match=error):
        FeedbackView.of(b)


def test_the_view_fields_on_the_wire() -> None:
    """As docs/wire/SPEC.md states them: appended after the body's fields, the cut only with ``global``, and a
    body from an older cloud (no ``view``) read by whether it carries tensors."""
    base = SiteFeedback("s", 1, 2, {}).to_body()
    cut = FeedbackView("global", ("image",), "A").add_to(dict(base))
    assert list(cut)[-2:] == ["view", "cut"] and cut["cut"] == {"factors": "A", "modalities": ["image"]}
    assert FeedbackView.of(cut) == FeedbackView("global", ("image",), "A")
    assert FeedbackView("global").add_to(dict(base))["cut"] == {"factors": "AB"}  # every modality: no list
    assert FeedbackView.of(FeedbackView("none").add_to(dict(base))) == FeedbackView("none")
    assert "cut" not in FeedbackView("tensors").add_to(dict(base))
    assert FeedbackView.of(base) == FeedbackView("none")
    with_tensors = SiteFeedback("s", 1, 2, {"t": np.zeros(2, np.float32)}).to_body()
    assert FeedbackView.of(with_tensors).mode == "tensors"
    assert issubclass(DecodeError, WireError)
