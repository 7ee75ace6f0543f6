"""kill -9 of the edge, the cloud and the broker of a running system: nothing acknowledged lost or taken twice.

The short version of ``python -m tests.reliability.system_kill --kills 10`` (figures per fault kind in
``bench/results/system_kill.json``): one system (durable Mosquitto, a cloud, 2 edges, 2 streaming
devices that also ask for predictions), and two kills of each kind at random moments, interleaved.
Broker kills may cost about one acknowledged record per publishing device per kill (Mosquitto 2.0's
window, ``deploy/mosquitto/durability.conf``); edge and cloud kills may cost none.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability.system_kill import run_phase

SCHEDULE = ["edge", "cloud", "broker", "edge", "cloud", "broker"]


@pytest.mark.timeout(150)
def test_kill_9_of_edge_cloud_and_broker_loses_forks_and_repeats_nothing(tmp_path: Path) -> None:
    r = run_phase(SCHEDULE, workdir=tmp_path, seed=5, gap_s=(1.5, 3.0), warmup_s=3.0, answer_timeout=20.0)
    assert r.seconds < 300, r.seconds  # a hang guard, not a speed claim (a loaded CI machine stretches the phase)
    # there was load: records, rounds, uploads, versions and predictions around the kills
    assert r.records_acked > 300 and r.uploads_accepted >= 4 and r.versions_committed >= 2, r
    assert r.predictions_requested > 30, r
    # records: exactly once, except the broker's own window
    assert r.records_unexpected == 0, r
    # a reconnecting device re-sends its registration under a fresh seq (it used to re-send the old one,
    # which the edge read as "the device lost its seq store": a record the broker had not acknowledged
    # then counted twice; ``--repro reconnect-duplicate`` shows the old envelope sequence)
    assert r.records_duplicated == 0, r
    assert r.records_lost <= r.broker_loss_bound, r
    assert r.lost_per_broker_kill[-1] == 0 and all(n <= r.devices for n in r.lost_per_broker_kill), r
    # uploads: each (edge, seq) accepted and applied at most once
    assert r.uploads_accepted_twice == 0 and r.uploads_applied_twice == 0, r
    # versions: the ledger's versions are 0..N, every one seen on the bus is in it, none with two contents
    assert r.ledger_versions_contiguous and r.versions_not_in_ledger == [], r
    assert r.versions_forked == 0, r
    # clean SIGTERM at the end, and no service crashed on anything
    assert all(code == 0 for code in r.exit_codes.values()), r.exit_codes
    assert not any(r.tracebacks.values()), (r.tracebacks, r.first_tracebacks)
