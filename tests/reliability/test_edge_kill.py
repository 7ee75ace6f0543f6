"""kill -9 of a real edge agent while a device streams at QoS 1: nothing acknowledged is lost or taken twice.

The short version of ``python -m tests.reliability.edge_kill --kills 10`` (figures in
``bench/results/edge_kill.json``). The agent acknowledges a device record to the broker only after
its ingest log holds it, and replays the log at start; without that, each kill lost every record
since the last checkpoint (64 of 168 in one try).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability.edge_kill import edge_kill_run


@pytest.mark.timeout(240)
def test_sigkill_of_the_edge_loses_and_duplicates_no_acknowledged_record(tmp_path: Path) -> None:
    run = edge_kill_run(3, 600, workdir=tmp_path, seed=3, rate_hz=150.0, gap_s=(1.0, 2.0))
    assert run.acked == 600
    assert run.lost == [] and run.duplicated == [], run
    assert run.in_checkpoint == 600
