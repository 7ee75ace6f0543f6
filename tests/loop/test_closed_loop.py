"""A shrunken closed loop, end to end through a real Mosquitto: 2 edge processes, a cloud process, 4 devices.

Tiny model, the 80 real BasicMotions recordings without augmentation, two rounds. Everything the
devices see (configs, predictions) and everything the edges send (adapters) crosses the broker.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from broker.address import BrokerAddress
from megace.loop.report import write_report
from megace.loop.results import LoopResult
from megace.loop.runner import run_loop
from megace.loop.settings import LoopSettings

ROUNDS = 2
EDGES = 2
CHANCE = 0.25  # four activities


@pytest.fixture(scope="module")
def loop_result(mosquitto_addr: BrokerAddress, tmp_path_factory: pytest.TempPathFactory) -> LoopResult:
    settings = LoopSettings(
        dataset="basicmotions", dataset_options={"augment": 0}, max_samples=None, edges=EDGES, devices_per_edge=2,
        alpha=1.0, ranks=(4, 2), rounds=ROUNDS, steps_per_round=10, strategy="modality-aware",
        broker_url=str(mosquitto_addr), out=tmp_path_factory.mktemp("loop"), round_timeout_s=60.0,
        services_timeout_s=60.0, time_limit_s=150.0,
    )
    return run_loop(settings)


@pytest.mark.timeout(180)
def test_every_edge_received_every_global_version(loop_result: LoopResult) -> None:
    assert len(loop_result.rounds) == ROUNDS, loop_result.stopped_because
    for r in loop_result.rounds:
        assert r.global_version is not None and r.global_version >= r.round
        assert len(r.edges) == EDGES
        for e in r.edges:
            assert e.global_version is not None and e.global_version >= r.round, (e.edge, e.global_version)
            assert e.edge_round is not None and e.edge_round >= r.round
    uploads = {e: sum(u["edge"] == e for u in loop_result.uploads) for e in ("edge-0", "edge-1")}
    assert all(n >= ROUNDS for n in uploads.values()), uploads
    # the single-modality edge gets the modality-aware view: traffic flows both ways for every edge
    final = loop_result.rounds[-1]
    assert all((e.bytes_up or 0) > 0 and (e.bytes_down or 0) > 0 for e in final.edges)


def test_devices_measure_accuracy_above_chance(loop_result: LoopResult) -> None:
    final = loop_result.rounds[-1]
    for e in final.edges:
        assert e.asked > 0 and e.answered == e.asked, (e.edge, e.answered, e.asked)
    asked = sum(e.asked for e in final.edges)
    correct = sum(round(e.device_acc * e.asked) for e in final.edges)
    # 40 test recordings: 0.45 is more than 2.5 binomial standard deviations above chance
    assert correct / asked >= 0.45, [(e.edge, e.device_acc) for e in final.edges]
    assert all(not math.isnan(a) and a > CHANCE for a in loop_result.global_acc.values()), loop_result.global_acc


def test_latency_is_split_into_legs(loop_result: LoopResult) -> None:
    lat = loop_result.latency
    assert len(lat) >= sum(e.asked for r in loop_result.rounds for e in r.edges)
    complete = [x for x in lat if x.uplink is not None and x.edge_time is not None and x.downlink is not None]
    assert len(complete) >= 0.9 * len(lat)
    for x in complete:
        assert 0 < x.e2e < 10
        assert abs(x.uplink + x.edge_time + x.downlink - x.e2e) < 0.005  # legs add up (1 ms stamps)


def test_report_files_are_written(loop_result: LoopResult, tmp_path: Path) -> None:
    report = write_report(loop_result, tmp_path)
    text = report.read_text()
    assert "Accuracy per round" in text and "edge-1" in text and "Prediction latency" in text
    for name in ("accuracy.png", "traffic.png", "latency.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    back = LoopResult.from_json(json.loads((tmp_path / "result.json").read_text()))
    assert [r.mean_acc for r in back.rounds] == pytest.approx([r.mean_acc for r in loop_result.rounds])
