"""Short fuzz runs (a few hundred inputs per target, well under a minute in all); ``tools/fuzz.py`` is the long run.

A failure here is shrunk by hypothesis to a small input that a decoder or handler mishandles.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from broker import topics
from tests.fuzz.services import CloudHarness, EdgeHarness
from tests.fuzz.strategies import envelope_map, pack
from tests.fuzz.targets import DECODER_TARGETS, PropertyViolation, Target
from tests.fuzz.targets import run_envelope as _run_envelope

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
