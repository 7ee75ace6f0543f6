"""Splitting a device's round trip at the tap's sightings: legs tile the round trip or are not given at all."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from megace.loop.results import LatencySample

ms = st.floats(min_value=0.0, max_value=50.0, allow_nan=False)


@given(sent=st.floats(min_value=0.0, max_value=1e6, allow_nan=False), up=ms, edge=ms, tap_lag=ms, down=ms)
def test_legs_tile_the_round_trip_when_the_tap_is_in_time(sent: float, up: float, edge: float, tap_lag: float,
                                                          down: float) -> None:
    """Request seen ``up`` ms after sending, answer out ``edge`` ms later; the tap sees it ``tap_lag`` ms after the
    device could have, the device ``down`` ms after it was out."""
    request_seen = sent + up / 1000
    received = request_seen + (edge + down) / 1000
    answer_seen = request_seen + (edge + tap_lag) / 1000
    x = LatencySample.from_stamps("edge-0", sent, received, request_seen, answer_seen, device="d", request=7)
    assert x.e2e == received - sent and (x.device, x.request) == ("d", 7)
    assert x.uplink is not None and x.edge_time is not None and x.downlink is not None
    assert min(x.uplink, x.edge_time, x.downlink) >= 0
    assert math.isclose(x.uplink + x.edge_time + x.downlink, x.e2e, rel_tol=1e-12, abs_tol=1e-12)
    assert math.isclose(x.uplink, up / 1000, abs_tol=1e-9)
    # the answer was out no later than the first of the two subscribers had it
    first_sighting = min(edge + tap_lag, edge + down)
    assert math.isclose(x.edge_time, first_sighting / 1000, abs_tol=1e-9)


@given(rtt=st.floats(min_value=0.001, max_value=50.0), late=st.floats(min_value=0.001, max_value=50.0))
def test_no_legs_when_the_tap_saw_the_request_after_the_answer(rtt: float, late: float) -> None:
    sent, received = 100.0, 100.0 + rtt / 1000
    request_seen = received + late / 1000  # a tap thread scheduled late
    x = LatencySample.from_stamps("edge-0", sent, received, request_seen, request_seen + 0.001)
    assert (x.uplink, x.edge_time, x.downlink) == (None, None, None)
    assert x.e2e == received - sent


def test_no_legs_without_both_sightings() -> None:
    assert LatencySample.from_stamps("e", 1.0, 1.01, None, None).uplink is None
    assert LatencySample.from_stamps("e", 1.0, 1.01, 1.002, None).edge_time is None
    assert LatencySample.from_stamps("e", 1.0, 1.01, None, 1.005).downlink is None
