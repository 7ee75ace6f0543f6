"""Short fuzz runs (a few hundred inputs per target, well under a minute in all); ``tools/fuzz.py`` is the long run.

A failure here is shrunk by hypothesis to a small input that a decoder or handler mishandles.
"""

from __future__ import annotations

import json
import logging
import platform
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from broker import topics
from tests.fuzz.services import CloudHarness, EdgeHarness
from tests.fuzz.strategies import envelope_map, pack
from tests.fuzz.targets import DECODER_TARGETS, PropertyViolation, Target
from tests.fuzz.targets import run_envelope as _run_envelope

ROOT = Path(__file__).resolve().parents[2]
FAST = settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))


def _short(target: Target, examples: int) -> None:
    @settings(FAST, max_examples=examples)
    @given(target.strategy())
    def check(value: Any) -> None:
        target.run(value)

    check()


@pytest.mark.parametrize("target", DECODER_TARGETS, ids=lambda t: t.name)
def test_decoders_raise_only_wire_errors(target: Target) -> None:
    _short(target, 100 if target.name in ("chunks", "inbox") else 200)


@pytest.fixture(scope="module")
def edge() -> Iterator[EdgeHarness]:
    logging.getLogger("edge_agent.core").setLevel(logging.ERROR)
    yield EdgeHarness()


def test_edge_ingest_never_raises_and_rejections_change_no_state(edge: EdgeHarness) -> None:
    _short(Target("edge", edge.strategy, edge.run), 250)
    counts = edge.core.counters.snapshot()
    assert counts.get("internal_errors", 0) == 0
    assert counts.get("rejected", 0) > 0  # the run did reach the refusals it is about


def test_cloud_ingest_never_raises() -> None:
    harness = CloudHarness()
    try:
        run = harness.run

        _short(Target("cloud", harness.strategy, run), 100)
        assert harness.inputs > 0
    finally:
        harness.core.close()


@pytest.mark.parametrize("index", ["\u00b2", "1" * 5000, "\u0663"])
def test_a_non_ascii_or_huge_chunk_index_is_refused_by_the_cloud_not_raised(index: str) -> None:
    """Found by the long fuzz run (118 times): ``str.isdigit`` accepts "²" and "٣", ``int()`` then failed
    outside the cloud's WireError guard."""
    harness = CloudHarness()
    try:
        harness.run([(f"{topics.adapter_up('s1')}/chunk/{index}", pack(envelope_map("chunk", {})))])
        assert harness.core.wire_errors == 1
    finally:
        harness.core.close()


def test_a_planted_untyped_error_is_caught_by_the_property() -> None:
    """The harness itself: a decoder raising anything but a WireError must count as a violation."""
    with pytest.raises(PropertyViolation, match="decode_envelope: TypeError"):
        _run_envelope(object())  # type: ignore[arg-type]  # len(object()) -> TypeError inside decode_envelope


@pytest.mark.skipif(not (sys.platform == "linux" and platform.machine() == "x86_64"),
                    reason="atheris ships wheels for Linux x86-64 only (pyproject's dev extra says so)")
def test_the_coverage_guided_run_feeds_every_input_to_its_target(tmp_path: Path) -> None:
    """A short ``tools/fuzz_atheris.py`` run: each target gets exactly the inputs asked for, a good share of the
    structured ones unpack into scripts that reach the handler, and nothing is violated."""
    out = tmp_path / "atheris.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "fuzz_atheris.py"), "--targets", "envelope,edge",
                           "--runs", "3000", "--out", str(out)], capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["inputs_total"] == 6000 and result["internal_errors_total"] == 0
    edge, env = result["targets"]["edge"], result["targets"]["envelope"]
    assert env["reached"] == env["inputs"] == 3000  # a payload needs no unpacking
    assert edge["inputs"] == 3000 and edge["reached"] >= edge["seeds"] > 100  # at least the seed scripts arrived
    assert edge["finished"] and edge["corpus_units"] >= edge["seeds"]
