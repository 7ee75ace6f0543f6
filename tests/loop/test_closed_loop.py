"""A shrunken closed loop, end to end through a real Mosquitto: 2 edge processes, a cloud process, 4 devices.

Tiny model, the 80 real BasicMotions recordings without augmentation, two rounds. Everything the
devices see (configs, predictions) and everything the edges send (adapters) crosses the broker.
What the edges and the cloud did is checked from the bus itself, with a subscriber of the test's own
(not the loop's monitor, whose view drives the runner's waits).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker import topics
from broker.address import BrokerAddress
from broker.runners import MosquittoBroker
from broker.wire import AdapterUpdate, DeviceFeedback, GlobalAdapter, Kind, SiteFeedback
from broker.wire.bodies import FeedbackView
from megace.loop.report import write_report
from megace.loop.results import LoopResult
from megace.loop.runner import run_loop
from megace.loop.settings import LoopSettings
from tests.support.collector import Collector

ROUNDS = 2
EDGES = 2
DEVICES_PER_EDGE = 2
RANKS = (4, 2)
CHANCE = 0.25  # four activities
VERSIONS = list(range(ROUNDS + 1))  # a fresh cloud publishes its initial global 0, then one version per round
AGGREGATED = VERSIONS[1:]


@dataclass
class Observed:
    """What the test's own subscriber saw on the bus during the run, decoded."""

    globals: list[GlobalAdapter]
    views: dict[str, list[SiteFeedback]]  # site -> feedback giving the site its view (tensors or a cut), in order
    relays: dict[str, list[DeviceFeedback]]  # device -> feedback its edge relayed after applying, in order
    uploads: dict[str, list[AdapterUpdate]]  # edge -> adapter uploads, in order


@dataclass
class Run:
    result: LoopResult
    bus: Observed


def _site(edge: int) -> str:
    return f"site-{edge}"


def _device(edge: int, d: int) -> str:
    return f"e{edge}-dev{d}"


def _observe(col: Collector) -> Observed:
    envelopes = col.wait_for(0, timeout=0)  # a copy, taken under the collector's lock
    bus = Observed([], {}, {}, {})
    for topic, env in envelopes:
        parsed = topics.parse(topic)
        if parsed.channel is topics.Channel.GLOBAL_DOWN:
            bus.globals.append(GlobalAdapter.from_body(env.body))
        elif parsed.channel is topics.Channel.SITE_FEEDBACK:
            if FeedbackView.of(env.body).mode != "none":  # not a bare acknowledgement
                bus.views.setdefault(parsed.site or "", []).append(SiteFeedback.from_body(env.body))
        elif parsed.channel is topics.Channel.ADAPTER_UP:
            up = AdapterUpdate.from_body(env.body)
            bus.uploads.setdefault(up.edge, []).append(up)
        elif env.kind is Kind.FEEDBACK:
            bus.relays.setdefault(parsed.device or "", []).append(DeviceFeedback.from_body(env.body))
    return bus


def _all_relayed(bus: Observed) -> bool:
    """Every training device has been told of the last version (the edges relay after applying)."""
    return all(any(f.global_version >= AGGREGATED[-1] for f in bus.relays.get(_device(e, d), []))
               for e in range(EDGES) for d in range(DEVICES_PER_EDGE))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    # A broker of this module's own: no retained global of another test can reach the loop or the collector.
    with MosquittoBroker(persistence=False) as broker:
        addr = BrokerAddress(broker.host, broker.port)
        filters = [*topics.subscriptions(topics.global_down()), *topics.subscriptions(topics.all_adapter_uplinks()),
                   f"{topics.ROOT}/site/+/device/+/down/{topics.Downlink.FEEDBACK.value}"]
        for e in range(EDGES):
            filters += topics.subscriptions(topics.site_feedback(_site(e)))
        col = Collector(addr, *filters).start()
        try:
            settings = LoopSettings(
                dataset="basicmotions", dataset_options={"augment": 0}, max_samples=None, edges=EDGES,
                devices_per_edge=DEVICES_PER_EDGE, alpha=1.0, ranks=RANKS, rounds=ROUNDS, steps_per_round=10,
                strategy="modality-aware", broker_url=str(addr), out=tmp_path_factory.mktemp("loop"),
                round_timeout_s=60.0, services_timeout_s=60.0, time_limit_s=150.0,
            )
            result = run_loop(settings)
            deadline = time.monotonic() + 20.0  # the last relays may still be on their way to the collector
            while not _all_relayed(_observe(col)) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not col.errors, col.errors
            yield Run(result, _observe(col))
        finally:
            col.stop()


@pytest.mark.timeout(180)
def test_every_edge_applied_every_global_version(run: Run) -> None:
    result, bus = run.result, run.bus
    assert len(result.rounds) == ROUNDS, result.stopped_because
    published = [g.version for g in bus.globals]  # (a reconnecting cloud re-announces its current global)
    assert published == sorted(published) and sorted(set(published)) == VERSIONS, published
    assert all(g.contributors == [] for g in bus.globals if g.version == 0)
    assert all(sorted(g.contributors) == [f"edge-{e}" for e in range(EDGES)] for g in bus.globals if g.version)
    for e in range(EDGES):
        # Round r's adapter was trained on global r - 1: the edge had applied every version before training on.
        assert [u.base_version for u in bus.uploads.get(f"edge-{e}", [])] == VERSIONS[:-1], e
        for d in range(DEVICES_PER_EDGE):
            # ("feedback" relays carry statistics only; "global" and "view" follow an apply)
            applied = [f.global_version for f in bus.relays.get(_device(e, d), []) if f.message in ("global", "view")]
            # An edge relays to its devices each version it applies: in order, every aggregated version, none skipped
            assert applied == sorted(applied) and set(AGGREGATED) <= set(applied) <= set(VERSIONS), (e, d, applied)


def test_single_modality_edge_is_served_its_site_view(run: Run) -> None:
    """Modality-aware: the edge with one modality (and the smaller rank) is served its own view, and uses it."""
    single = [e for e in range(EDGES) if len(run.result.partition[f"edge-{e}"]["modalities"]) == 1]
    assert single, run.result.partition
    for e in single:
        views = run.bus.views.get(_site(e), [])  # a cut of the global it receives anyway: no tensors
        # a view follows each new version (and the cloud repeats it when it accepts an upload): in order, all of them
        assert [v.version for v in views] == sorted(v.version for v in views), e
        assert set(AGGREGATED) <= {v.version for v in views} <= set(VERSIONS), e
        assert all(v.rank == RANKS[e] and v.site == _site(e) for v in views)
        # The broadcast global has the largest rank, which this edge cannot use: everything it applied is a view.
        assert all(g.rank == max(RANKS) for g in run.bus.globals)
        for d in range(DEVICES_PER_EDGE):
            relays = run.bus.relays.get(_device(e, d), [])
            assert relays and all(f.message == "view" for f in relays), (e, d, [f.message for f in relays])
            assert set(AGGREGATED) <= {f.global_version for f in relays}


def test_devices_measure_accuracy_above_chance(run: Run) -> None:
    final = run.result.rounds[-1]
    for e in final.edges:
        assert e.asked > 0 and e.answered == e.asked, (e.edge, e.answered, e.asked)
    asked = sum(e.asked for e in final.edges)
    correct = sum(round(e.device_acc * e.asked) for e in final.edges)
    # 40 test recordings: 0.45 is more than 2.5 binomial standard deviations above chance
    assert correct / asked >= 0.45, [(e.edge, e.device_acc) for e in final.edges]
    assert all(not math.isnan(a) and a > CHANCE for a in run.result.global_acc.values()), run.result.global_acc


def test_latency_legs_lie_inside_the_round_trip(run: Run) -> None:
    result = run.result
    lat = result.latency
    assert len(lat) == sum(e.answered for r in result.rounds for e in r.edges)
    assert len({(x.device, x.request) for x in lat}) == len(lat)  # one sample per answered request
    split = [x for x in lat if x.uplink is not None and x.edge_time is not None and x.downlink is not None]
    # On an idle machine every request splits; on a starved one the tap's thread can see a request only after
    # the device had its answer, and that request is left unsplit (never given negative legs). Clocks mixed up
    # (e.g. wall clock against monotonic) would put no tap stamp inside any round trip: none would split.
    assert split, "no request could be split into legs"
    for x in split:
        assert 0 < x.e2e < 10
        # every stamp is on the devices' clock: each leg falls inside the round trip, and they tile it
        assert 0 < x.uplink <= x.e2e and 0 < x.edge_time <= x.e2e and 0 <= x.downlink <= x.e2e, x
        assert x.uplink + x.edge_time + x.downlink == pytest.approx(x.e2e, abs=1e-9), x
    for r in result.rounds:
        for e in r.edges:
            # the same requests as the devices' own per-round median (taken from their own send/receive times)
            mine = [1000 * x.e2e for x in lat if x.round == r.round and x.edge == e.edge]
            assert len(mine) == e.answered
            assert statistics.median(mine) == pytest.approx(e.latency_ms_p50, rel=1e-9), (r.round, e.edge)


def test_report_files_are_written(run: Run, tmp_path: Path) -> None:
    result = run.result
    report = write_report(result, tmp_path)
    text = report.read_text()
    assert "Accuracy per round" in text and "edge-1" in text and "Prediction latency" in text
    for name in ("accuracy.png", "traffic.png", "latency.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    back = LoopResult.from_json(json.loads((tmp_path / "result.json").read_text()))
    assert [r.mean_acc for r in back.rounds] == pytest.approx([r.mean_acc for r in result.rounds])
    def key(xs: list) -> list:
        return [(x.device, x.request, x.round, x.e2e) for x in xs]

    assert key(back.latency) == key(result.latency)
