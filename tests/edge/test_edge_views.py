"""Edges cut their site's view from the global they received, and install exactly what the cloud would have sent.

A real ``AggregatorCore`` and three real ``EdgeCore`` s (tiny trainers, LoRA ranks 8/4/2, alpha = 2r) exchange
real message bytes in-process, the way the broker would deliver them; every install goes through
``EdgeCore.apply`` as the service runs it. Expectations are computed here in numpy from the published global
(``tests.support.np_reference.fit_rank``, B divided by alpha/r = 2), never with ``megace_common.views``, and the
result is also compared with edges served by a cloud that sends every view as tensors (the old traffic).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from broker import topics
from broker.address import BrokerAddress
from broker.wire import GlobalAdapter, SiteFeedback, decode_envelope
from broker.wire.bodies import FeedbackView, decode_body
from cloud_aggregator.core import AggregatorCore
from cloud_aggregator.messages import Outgoing
from edge_agent.checkpoints import build_trainer
from edge_agent.core import EdgeCore
from edge_agent.training.toy_task import toy_config
from tests.support import np_reference as ref
from tests.support.cloud_bus import cloud_config, perturbed, update_payload
from tests.support.edge_testkit import edge_config

torch.set_num_threads(1)

NOWHERE = BrokerAddress("127.0.0.1", 1)  # nothing connects: messages are handed over in-process
RANKS = (8, 4, 2)
ALL = {"env": 6, "imu": 6}
MODALITIES = (ALL, {"env": 0, "imu": 6}, {"env": 6, "imu": 0})  # the smaller ranks each lack a modality


class Fleet:
    """One cloud core and one edge core per rank; ``deliver`` routes what the cloud publishes as a broker would."""

    def __init__(self, root: Path, strategy: str, feedback_tensors: str = "needed") -> None:
        agg = {"strategy": strategy, "buffer_k": len(RANKS), "feedback_tensors": feedback_tensors}
        self.cloud = AggregatorCore(cloud_config(root / "cloud", NOWHERE, model=toy_config().to_dict(),
                                                 aggregation=agg))
        self.edges: list[EdgeCore] = []
        for i, r in enumerate(RANKS):
            cfg = edge_config(root / f"edge{i}", NOWHERE, {"site": f"s{i}", "edge_id": f"edge-s{i}",
                                                          "model": {"lora_r": r, "lora_alpha": 2 * r}})
            self.edges.append(EdgeCore(cfg, trainer=build_trainer(cfg)))
        self.seq = 0

    def close(self) -> None:
        self.cloud.close()

    def deliver(self, out: list[Outgoing], *, feedback_first: bool = False) -> None:
        """Each edge gets the global and its own site's feedback (in the given order) and installs what it asks."""
        for edge in self.edges:
            mine = [o for o in out if o.topic in (topics.global_down(), topics.site_feedback(edge.site))]
            if feedback_first:
                mine.sort(key=lambda o: o.topic == topics.global_down())
            for o in mine:
                for job in edge.ingest(o.topic, o.payload).applies:
                    edge.apply(job.source, job.version, job.tensors)

    def round(self, *, feedback_first: bool = False) -> list[Outgoing]:
        """Every edge uploads a moved copy of what it holds; the last upload fills the buffer (k = 3)."""
        self.seq += 1
        out: list[Outgoing] = []
        for i, edge in enumerate(self.edges):
            own = shared(edge)
            moved = perturbed(own, seed=zlib.crc32(f"{edge.site}/{self.seq}".encode()), scale=0.05)
            base = max(edge.state.global_version, 0)  # as edge_agent.uploads sends it
            payload = update_payload(moved, site=edge.site, seq=self.seq, base_version=base,
                                     fingerprint=self.cloud.fingerprint, rank=RANKS[i], samples=8,
                                     modalities=MODALITIES[i], edge=edge.edge_id)
            got = self.cloud.ingest(topics.adapter_up(edge.site), payload)
            out += got
            self.deliver(got, feedback_first=feedback_first)
        return out


def shared(edge: EdgeCore) -> dict[str, np.ndarray]:
    assert edge.trainer is not None
    return {n: t.detach().clone().numpy() for n, t in edge.trainer.shared_state().items()}


def published_global(out: list[Outgoing]) -> dict[str, np.ndarray]:
    [g] = [decode_body(decode_envelope(o.payload)) for o in out if o.topic == topics.global_down()]
    assert isinstance(g, GlobalAdapter) and g.alpha == g.rank  # stored at scaling 1
    return {n: np.asarray(t, dtype=np.float64) for n, t in g.tensors.items()}


def expected_view(glob: dict[str, np.ndarray], before: dict[str, np.ndarray], rank: int,
                  modalities: dict[str, int] | None) -> dict[str, np.ndarray]:
    """What the edge holds after installing its view: the cut of the global where the view has the tensor
    (first r components, B / (alpha/r) = B / 2), its own values where it does not (a modality it lacks)."""
    out = {}
    for n, own in before.items():
        mod = ref.modality(n)
        if modalities is not None and mod is not None and modalities.get(mod, 0) == 0:
            out[n] = own
            continue
        kind = ref.split(n)[1]
        out[n] = (ref.fit_rank(glob[n], kind, rank) / (2.0 if kind == "B" else 1.0)).astype(np.float32)
    return out


@pytest.fixture
def fleets(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Fleet, Fleet]]:
    """The same fleet twice: a cloud that sends a view only where needed, and one that always sends tensors."""
    strategy = request.param
    now, old = Fleet(tmp_path / "needed", strategy), Fleet(tmp_path / "always", strategy, "always")
    try:
        yield now, old
    finally:
        now.close()
        old.close()


@pytest.mark.parametrize("fleets", ["fedavg", "modality-aware"], indirect=True)
@pytest.mark.parametrize("feedback_first", [False, True], ids=["global-first", "feedback-first"])
def test_edges_install_exactly_the_view_the_cloud_would_have_sent(fleets: tuple[Fleet, Fleet],
                                                                  feedback_first: bool) -> None:
    now, old = fleets
    aware = now.cloud.strategy.name == "modality-aware"
    for fleet in fleets:
        fleet.deliver(fleet.cloud.announce())
    for rnd in (1, 2):
        befores = [shared(e) for e in now.edges]
        out = now.round(feedback_first=feedback_first)
        old.round(feedback_first=feedback_first)
        assert now.cloud.version == old.cloud.version == rnd
        # no site feedback carried a tensor: every view was named as a cut of the global
        assert all(not decode_body(decode_envelope(o.payload)).tensors for o in out
                   if o.topic.endswith("/feedback"))
        glob = published_global(out)
        for i, (edge, before) in enumerate(zip(now.edges, befores, strict=True)):
            assert (edge.state.global_version, edge.state.global_source) == (rnd, "view"), edge.site
            want = expected_view(glob, before, RANKS[i], MODALITIES[i] if aware else None)
            got = shared(edge)
            assert sorted(got) == sorted(want)
            for n in want:
                np.testing.assert_array_equal(got[n], want[n], err_msg=f"{edge.site} {n}")
            # and bit for bit what an edge of the old traffic holds, the view received as tensors
            theirs = shared(old.edges[i])
            assert all(np.array_equal(got[n], theirs[n]) for n in got), edge.site
        assert any(e.counters["views_cut"] for e in now.edges)
        assert not any(e.counters["views_cut"] for e in old.edges)
    if feedback_first:  # the cut waited for its global, which arrived after it
        assert all(e.counters["view_awaits_global"] >= 1 for e in now.edges)


def test_an_acknowledgement_settles_the_upload_and_installs_nothing(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, "fedavg")
    try:
        fleet.deliver(fleet.cloud.announce())
        edge = fleet.edges[1]
        payload = update_payload(shared(edge), site=edge.site, seq=1, base_version=0,
                                 fingerprint=fleet.cloud.fingerprint, rank=4, samples=8, edge=edge.edge_id)
        [ack] = fleet.cloud.ingest(topics.adapter_up(edge.site), payload)
        body = decode_envelope(ack.payload).body
        fb = decode_body(decode_envelope(ack.payload))
        assert isinstance(fb, SiteFeedback) and fb.accepted == [1] and fb.tensors == {}
        assert FeedbackView.of(body).mode == "global"  # it names the cut of v0, which this edge runs
        edge.apply("view", 0, shared(edge))  # as after installing its view of v0
        fx = edge.ingest(ack.topic, ack.payload)
        assert fx.verdicts == [(1, None)] and fx.applies == [] and fx.out == []
    finally:
        fleet.close()


def test_a_view_that_is_not_a_cut_arrives_as_tensors_and_is_installed(tmp_path: Path) -> None:
    """FLoRA stacks the factors (rank 8+4+2): an edge's view is the best rank-r fit of B A, not a slice."""
    fleet = Fleet(tmp_path, "flora")
    try:
        fleet.deliver(fleet.cloud.announce())
        out = fleet.round()
        glob = published_global(out)
        feedback = {topics.site_feedback(e.site) for e in fleet.edges}
        views = {o.topic: FeedbackView.of(decode_envelope(o.payload).body) for o in out if o.topic in feedback}
        assert len(views) == len(fleet.edges)
        assert {v.mode for v in views.values()} == {"tensors"}
        for i, edge in enumerate(fleet.edges):
            assert (edge.state.global_version, edge.state.global_source) == (1, "view")
            got = shared(edge)
            for m in {ref.split(n)[0] for n in glob if ref.split(n)}:
                a, b = f"{m}.lora_A.weight", f"{m}.lora_B.weight"
                dense = glob[b] @ glob[a]
                # the edge's ΔW, (alpha/r) B A, is the best rank-r approximation of the global's
                np.testing.assert_allclose(2.0 * got[b].astype(np.float64) @ got[a], ref.best_rank(dense, RANKS[i]),
                                           rtol=1e-4, atol=1e-5, err_msg=f"{edge.site} {m}")
            if RANKS[i] < 8:  # a slice of the stacked factors would be another, worse, adapter
                m = "base_model.model.backbone.encoder.layer.0.attention.self.query"
                sliced = ref.fit_rank(glob[f"{m}.lora_A.weight"], "A", RANKS[i])
                assert not np.allclose(got[f"{m}.lora_A.weight"], sliced, atol=1e-4)
    finally:
        fleet.close()


def test_a_cut_of_a_malformed_global_is_refused_not_an_internal_error(tmp_path: Path) -> None:
    from broker.wire import Kind, encode_envelope

    cfg = edge_config(tmp_path / "e", NOWHERE, {"site": "s0"})
    edge = EdgeCore(cfg, trainer=build_trainer(cfg))
    assert edge.trainer is not None
    bad = GlobalAdapter(3, edge.trainer.fingerprint, "fedavg", 8, 8.0, {"m.lora_B.weight": np.zeros(3, np.float32)})
    edge.ingest(topics.global_down(), encode_envelope(Kind.GLOBAL, "cloud", 3, bad.to_body()))
    fb = FeedbackView("global").add_to(SiteFeedback("s0", 3, 8, {}).to_body())
    fx = edge.ingest(topics.site_feedback("s0"), encode_envelope(Kind.SITE_FEEDBACK, "cloud", 4, fb))
    assert fx.applies == [] and edge.counters["rejected.AdapterMismatchError"] == 1
    assert edge.counters["internal_errors"] == 0
