"""The edge's ReceiptTracker in detail: what a seal snapshots, what the counters say, and when receipts go out.

Why: a receipt sent too early releases records a crash would lose; one never sent keeps a device re-sending;
one per record floods the downlinks. The module's clock is replaced by a settable one (``receipts.time``) so
the interval arithmetic is exact; the asyncio loop and its timers stay real.
"""

from __future__ import annotations

import asyncio
import types
from pathlib import Path

import pytest

from broker.address import BrokerAddress
from broker.wire import Kind, Receipt, decode_envelope
from edge_agent import receipts as receipts_module
from edge_agent.core import EdgeCore, Outgoing
from edge_agent.receipts import ReceiptTracker
from tests.support.edge_testkit import edge_config

NOWHERE = BrokerAddress("127.0.0.1", 1)


class Clock:
    """A settable monotonic clock for the module under test."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def core(tmp_path: Path) -> EdgeCore:
    return EdgeCore(edge_config(tmp_path / "state", NOWHERE))


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(receipts_module, "time", types.SimpleNamespace(monotonic=c.monotonic))
    return c


def _receipts(sent: list[Outgoing]) -> list[tuple[str, Receipt]]:
    out = []
    for msg in sent:
        env = decode_envelope(msg.payload)
        assert env.kind is Kind.RECEIPT
        r = Receipt.from_body(env.body)
        assert msg.topic.endswith(f"/device/{r.device}/down/receipt")
        out.append((r.device, r))
    return out


def _commit(tracker: ReceiptTracker) -> None:
    tracker.seal()
    tracker.durable()


def _record(tracker: ReceiptTracker, device: str, seq: int) -> None:
    """A record of ``device`` at ``seq`` accepted by the guard, touched and committed, as the core does."""
    tracker.core.registry.features.accept(device, seq)
    tracker.touched(device)
    _commit(tracker)


def test_defaults(core: EdgeCore) -> None:
    t = ReceiptTracker(core, [].extend, core.counters)
    assert (t.interval_s, t.enabled, t.durable_on_touch) == (0.2, True, False)


async def test_coalesced_per_device_and_sent_at_exactly_the_interval(core: EdgeCore, clock: Clock) -> None:
    sent: list[Outgoing] = []
    t = ReceiptTracker(core, sent.extend, core.counters, interval_s=0.5)
    g = core.registry.features
    _record(t, "a", 1)  # the first receipt of a device goes at once
    assert _receipts(sent) == [("a", Receipt("a", 1))]
    g.accept("a", 3)
    t.touched("a")
    clock.now = 100.4
    _commit(t)
    assert len(sent) == 1  # 0.4 s after the last: held
    clock.now = 100.5
    t.flush()  # exactly the interval: due
    assert _receipts(sent)[1] == ("a", Receipt("a", 3, (2,)))
    assert core.counters["receipts_sent"] == 2
    t.flush()
    assert len(sent) == 2  # nothing ready: nothing more


async def test_the_timer_fires_for_the_soonest_device_then_re_arms(core: EdgeCore, clock: Clock) -> None:
    sent: list[Outgoing] = []
    t = ReceiptTracker(core, sent.extend, core.counters, interval_s=0.3)
    g = core.registry.features
    _record(t, "a", 1)  # a told at 100.0
    clock.now = 100.2
    _record(t, "b", 1)  # b told at 100.2
    assert [d for d, _ in _receipts(sent)] == ["a", "b"]
    clock.now = 100.25
    g.accept("a", 2)
    g.accept("b", 2)
    t.touched("a")
    t.touched("b")
    _commit(t)  # a due at 100.3 (wait 0.05), b due at 100.5 (wait 0.25): a timer for the sooner
    assert len(sent) == 2
    clock.now = 100.3
    await asyncio.sleep(0.15)
    assert _receipts(sent)[2:] == [("a", Receipt("a", 2))]  # b still waits
    clock.now = 100.5
    await asyncio.sleep(0.3)
    assert _receipts(sent)[3:] == [("b", Receipt("b", 2))]
    assert core.counters["receipts_sent"] == 4


async def test_seal_snapshots_only_what_was_touched_and_known(core: EdgeCore, clock: Clock) -> None:
    sent: list[Outgoing] = []
    t = ReceiptTracker(core, sent.extend, core.counters, interval_s=0.0)
    g = core.registry.features
    t.touched("ghost")  # touched but the guard never accepted a seq: no receipt
    t.touched(None)
    _commit(t)
    assert sent == []
    g.accept("a", 0)
    t.touched("a")
    await asyncio.sleep(0.01)  # records not yet durable: no receipt without a commit, however long
    assert sent == []
    t.seal()
    t.durable()
    assert _receipts(sent) == [("a", Receipt("a", 0))]
    sent.clear()
    g.accept("a", 1)
    g.accept("a", 4)
    t.touched("a")
    t.seal()
    g.accept("a", 2)  # after the seal: not in this commit's receipt
    t.durable()
    assert _receipts(sent) == [("a", Receipt("a", 4, (2, 3)))]
    t.durable()  # no new seal: nothing
    t.seal()  # nothing touched since: nothing sealed
    t.durable()
    assert len(sent) == 1
    clock.now = 101.0
    t.touched("a")
    _commit(t)
    assert _receipts(sent)[1] == ("a", Receipt("a", 4, (3,)))


async def test_the_guards_fills_abandoned_and_closed_are_counted_as_deltas(core: EdgeCore, clock: Clock) -> None:
    sent: list[Outgoing] = []
    t = ReceiptTracker(core, sent.extend, core.counters, interval_s=0.0)
    g = core.registry.features
    g.max_gaps = 2
    g.accept("a", 0)
    g.accept("a", 5)  # 1..4 skipped: keeps 3 and 4, abandons 1 and 2
    g.accept("a", 3)  # a fill
    t.touched("a")
    t.seal()
    assert (core.counters["receipt_fills"], core.counters["receipt_gaps_abandoned"],
            core.counters["receipt_gaps_closed"]) == (1, 2, 0)
    t.touched("a")
    t.seal()  # nothing new in the guard: the counters do not move
    assert (core.counters["receipt_fills"], core.counters["receipt_gaps_abandoned"]) == (1, 2)
    g.floor("a", 5)  # closes 4
    g.accept("a", 9)  # 6..8 skipped: keeps 7 and 8, abandons 6
    g.accept("a", 7)
    t.touched("a")
    t.seal()
    assert (core.counters["receipt_fills"], core.counters["receipt_gaps_abandoned"],
            core.counters["receipt_gaps_closed"]) == (2, 3, 1)


async def test_a_device_not_due_yet_does_not_hold_back_one_that_is(core: EdgeCore, clock: Clock) -> None:
    sent: list[Outgoing] = []
    t = ReceiptTracker(core, sent.extend, core.counters, interval_s=0.3)
    _record(t, "a", 1)  # a told at 100.0
    clock.now = 100.1
    _record(t, "a", 2)  # a waits (due at 100.3), first in line
    _record(t, "c", 1)  # c was never told: it goes now, past the waiting a
    assert _receipts(sent) == [("a", Receipt("a", 1)), ("c", Receipt("c", 1))]


async def test_gaps_closed_before_the_first_seal_are_counted(core: EdgeCore, clock: Clock) -> None:
    t = ReceiptTracker(core, [].extend, core.counters, interval_s=0.0)
    g = core.registry.features
    g.accept("a", 0)
    g.accept("a", 4)  # 1..3 skipped
    g.floor("a", 3)  # the device will never send 1 or 2: two gaps closed
    t.touched("a")
    t.seal()
    assert (core.counters["receipt_fills"], core.counters["receipt_gaps_abandoned"],
            core.counters["receipt_gaps_closed"]) == (0, 0, 2)


async def test_disabled_tracks_nothing(core: EdgeCore, clock: Clock) -> None:
    sent: list[Outgoing] = []
    t = ReceiptTracker(core, sent.extend, core.counters, interval_s=0.0, enabled=False, durable_on_touch=True)
    core.registry.features.accept("a", 1)
    t.touched("a")
    _commit(t)
    await asyncio.sleep(0.01)
    assert sent == [] and core.counters["receipts_sent"] == 0


async def test_durable_on_touch_sends_once_per_loop_turn(core: EdgeCore, clock: Clock) -> None:
    sent: list[Outgoing] = []
    t = ReceiptTracker(core, sent.extend, core.counters, interval_s=0.0, durable_on_touch=True)
    g = core.registry.features
    g.accept("a", 1)
    t.touched("a")
    g.accept("b", 1)
    t.touched("b")
    assert sent == []
    await asyncio.sleep(0)
    assert sorted(d for d, _ in _receipts(sent)) == ["a", "b"] and len(sent) == 2
    assert core.counters["receipts_sent"] == 2  # one emit of two receipts counts two
    clock.now = 100.1
    g.accept("a", 2)
    t.touched("a")  # a second turn schedules again
    await asyncio.sleep(0)
    assert _receipts(sent)[2:] == [("a", Receipt("a", 2))]


async def test_a_receipt_that_cannot_be_built_is_counted_and_the_others_go(core: EdgeCore, clock: Clock) -> None:
    sent: list[Outgoing] = []
    t = ReceiptTracker(core, sent.extend, core.counters, interval_s=0.0)
    g = core.registry.features
    g.accept("bad.id", 1)  # no valid topic for it: core.down raises a WireError
    g.accept("a", 1)
    t.touched("bad.id")
    t.touched("a")
    _commit(t)
    assert _receipts(sent) == [("a", Receipt("a", 1))]
    assert core.counters["receipt_errors"] == 1 and core.counters["receipts_sent"] == 1


async def test_last_sent_is_bounded_to_twice_the_devices(core: EdgeCore, clock: Clock) -> None:
    sent: list[Outgoing] = []
    t = ReceiptTracker(core, sent.extend, core.counters, interval_s=1.0)
    core.registry.max_devices = 2  # at most 4 remembered
    g = core.registry.features
    for device, now in (("a", 100.0), ("b", 100.25), ("c", 100.5), ("d", 101.0)):
        clock.now = now
        g.accept(device, 1)
        t.touched(device)
        _commit(t)
    assert sorted(t._last_sent) == ["a", "b", "c", "d"]  # four: not over the bound, nothing forgotten
    clock.now = 102.0
    _record(t, "e", 1)
    # five > 4: forget those told more than 1 s ago (a, b, c); d was told exactly 1 s ago and stays
    assert sorted(t._last_sent) == ["d", "e"]
    assert len(sent) == 5


def test_attach_wires_a_real_agents_config_and_commits(tmp_path: Path) -> None:
    from edge_agent.service import EdgeAgent

    agent = EdgeAgent(edge_config(tmp_path / "s", NOWHERE, {"receipt_interval_s": 0.7, "ingest_receiver": "inline"}))
    r = agent.receipts
    assert (r.interval_s, r.enabled, r.durable_on_touch) == (0.7, True, False)
    # a receiver process logs records before the agent sees them: each is durable when it is touched
    by_process = EdgeAgent(edge_config(tmp_path / "p", NOWHERE, {"ingest_receiver": "process"})).receipts
    assert by_process.durable_on_touch is True
    assert r.core is agent.core and r.counters is agent.counters and r.emit == agent.downlinks.emit
    assert agent.acks.on_seal == r.seal and agent.acks.on_durable == r.durable
    off = EdgeAgent(edge_config(tmp_path / "t", NOWHERE, {"receipts": False}))
    assert off.receipts.enabled is False
    assert off.acks.on_seal is None and off.acks.on_durable is None
