"""The real closed loop (cloud and edge processes, SDK devices) on every external broker of the matrix.

Each broker is started by this module from Debian's package on free loopback ports. The run must complete its
rounds with every global version published in order, each aggregated one with both edges as contributors.
RabbitMQ runs with ``late_edges`` (its happy path too, for a minute less of suite time), the case that failed:
the devices register (retained) before any edge exists, RabbitMQ never delivers those retained registrations
through the edge's ``device/+/up/+`` filter, and the edges used to refuse every record as ``unregistered``;
now each edge asks its site to register again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from broker import topics
from broker.address import BrokerAddress
from broker.capabilities import capabilities
from broker.runners import MosquittoBroker, NatsBroker, RabbitMQBroker
from broker.wire import AdapterUpdate, GlobalAdapter
from megace.loop.results import LoopResult
from megace.loop.runner import ClosedLoop
from megace.loop.settings import LoopSettings
from tests.broker.test_matrix import _publish
from tests.support.collector import Collector

ROUNDS = 2
EDGES = 2
EDGE_IDS = [f"edge-{e}" for e in range(EDGES)]
VERSIONS = list(range(ROUNDS + 1))  # a fresh cloud publishes version 0, then one per round
RUNNERS: dict[str, Callable[[], Any]] = {
    "mosquitto": lambda: MosquittoBroker(persistence=False),
    "nats": NatsBroker,
    "rabbitmq": RabbitMQBroker,
}


@dataclass
class Run:
    loop: ClosedLoop
    result: LoopResult
    globals: list[GlobalAdapter]
    uploads: dict[str, list[AdapterUpdate]]


@pytest.fixture(scope="module")
def brokers() -> Iterator[Callable[[str], BrokerAddress]]:
    """Brokers of this module's own, started on first use (RabbitMQ takes seconds) and shared by its runs."""
    started: dict[str, Any] = {}

    def get(name: str) -> BrokerAddress:
        if name not in started:
            started[name] = RUNNERS[name]().start()
        b = started[name]
        return BrokerAddress(b.host, b.port)

    try:
        yield get
    finally:
        for b in started.values():
            b.close()


def _run(addr: BrokerAddress, out: Any, *, late_edges: bool) -> Run:
    filters = [*topics.subscriptions(topics.global_down()), *topics.subscriptions(topics.all_adapter_uplinks())]
    _publish(addr, (topics.global_down(), b"", True))  # an earlier run's global: its exact subscriber would get it
    with Collector(addr, *filters) as col:  # subscribed before the cloud exists: live delivery, any broker
        settings = LoopSettings(
            dataset="basicmotions", dataset_options={"augment": 0}, max_samples=None, edges=EDGES,
            devices_per_edge=1, alpha=1.0, ranks=(4, 2), rounds=ROUNDS, steps_per_round=4,
            strategy="fedavg", broker_url=str(addr), out=out, global_eval=False, late_edges=late_edges,
            round_timeout_s=120.0, services_timeout_s=150.0, time_limit_s=360.0,
        )
        loop = ClosedLoop(settings)
        result = loop.run()
        assert not col.errors, col.errors
        envelopes = col.wait_for(0, timeout=0)
    bus = Run(loop, result, [], {})
    for topic, env in envelopes:
        channel = topics.parse(topic).channel
        if channel is topics.Channel.GLOBAL_DOWN:
            bus.globals.append(GlobalAdapter.from_body(env.body))
        elif channel is topics.Channel.ADAPTER_UP:
            up = AdapterUpdate.from_body(env.body)
            bus.uploads.setdefault(up.edge, []).append(up)
    return bus


@pytest.mark.timeout(600)
@pytest.mark.parametrize(("broker", "late_edges"), [("mosquitto", False), ("nats", False), ("rabbitmq", True)],
                         ids=lambda v: str(v))
def test_the_closed_loop_completes_on_every_broker(brokers, broker: str, late_edges: bool, tmp_path) -> None:
    run = _run(brokers(broker), tmp_path, late_edges=late_edges)
    assert len(run.result.rounds) == ROUNDS, run.result.stopped_because
    devices = run.loop.devices
    assert devices and all(d.config is not None for d in devices), [(d.name, d.errors[:3]) for d in devices]
    # every record a device sent was accepted: none refused as unregistered (the failure this guards against)
    assert all(not d.errors for d in devices), [(d.name, d.errors[:3]) for d in devices]
    published = [g.version for g in run.globals]  # (a reconnecting cloud may re-announce its current global)
    assert published == sorted(published) and sorted(set(published)) == VERSIONS, published
    for g in run.globals:
        assert sorted(g.contributors) == ([] if g.version == 0 else EDGE_IDS), (g.version, g.contributors)
    for edge in EDGE_IDS:  # round r trained on global r - 1
        assert [u.base_version for u in run.uploads.get(edge, [])] == VERSIONS[:-1], (edge, run.uploads.get(edge))
    if late_edges:  # each device answered its edge's request (on RabbitMQ the only way the edge could learn it)
        asked = [d.client.counters["reregistered.request"] for d in devices]
        assert all(n >= 1 for n in asked), asked
        assert not capabilities(broker).retained_via_wildcard  # the case this run exists for
