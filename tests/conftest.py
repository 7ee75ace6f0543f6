"""Session fixtures: real brokers on free loopback ports, started by the tests themselves."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from broker.address import BrokerAddress
from broker.runners import EmbeddedBroker, MosquittoBroker, NatsBroker, RabbitMQBroker


@pytest.fixture(scope="session")
def mosquitto() -> Iterator[MosquittoBroker]:
    """A private Mosquitto for the whole session (not the system one on 1883)."""
    with MosquittoBroker() as broker:
        yield broker


@pytest.fixture(scope="session")
def mosquitto_addr(mosquitto: MosquittoBroker) -> BrokerAddress:
    return BrokerAddress(mosquitto.host, mosquitto.port)


@pytest.fixture(scope="session")
def embedded_broker() -> Iterator[EmbeddedBroker]:
    """The embedded amqtt broker, running in its own thread for the session."""
    with EmbeddedBroker() as broker:
        yield broker


@pytest.fixture(scope="session")
def embedded_addr(embedded_broker: EmbeddedBroker) -> BrokerAddress:
    return embedded_broker.address  # says protocol=3.1.1: the runner knows it has no MQTT 5


@pytest.fixture(scope="session")
def nats_broker() -> Iterator[NatsBroker]:
    """A private single-node nats-server (JetStream + MQTT listener) for the session, not the system one."""
    with NatsBroker() as broker:
        yield broker


@pytest.fixture(scope="session")
def nats_addr(nats_broker: NatsBroker) -> BrokerAddress:
    return nats_broker.address  # says protocol=3.1.1: the runner knows it has no MQTT 5


@pytest.fixture(scope="session")
def rabbitmq_broker() -> Iterator[RabbitMQBroker]:
    """A private RabbitMQ with its MQTT plugin for the session (about 10 s to start), not the system one."""
    with RabbitMQBroker() as broker:
        yield broker


@pytest.fixture(scope="session")
def rabbitmq_addr(rabbitmq_broker: RabbitMQBroker) -> BrokerAddress:
    return rabbitmq_broker.address  # says protocol=3.1.1: the runner knows it has no MQTT 5


BROKER_MATRIX = ["mosquitto", "embedded", "nats", "rabbitmq"]
"""Every broker the bus tests run on; what each lacks is in :mod:`broker.capabilities`."""


@pytest.fixture(params=BROKER_MATRIX)
def any_broker(request: pytest.FixtureRequest) -> BrokerAddress:
    """Run a test against every broker of the matrix."""
    return request.getfixturevalue(f"{request.param}_addr")


@pytest.fixture
def fresh_mosquitto() -> Iterator[MosquittoBroker]:
    """A Mosquitto of the test's own, for tests that stop and restart it."""
    broker = MosquittoBroker()
    broker.start()
    try:
        yield broker
    finally:
        broker.close()


def _is_dashboard(item: pytest.Item) -> bool:
    return item.nodeid.replace(os.sep, "/").startswith("tests/dashboard/")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The dashboard's browser tests run last, in their own order: they share one loop run and one Chromium."""
    items.sort(key=_is_dashboard)


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadfile`` (``./dev.sh test``), with every dashboard test on one worker: a test file's tests go to
    one worker, so module-scoped fixtures start once, and the dashboard files' session-wide loop run and Chromium
    start once too. (``--dist loadgroup`` with ``xdist_group`` marks would say this, but pytest-xdist 3.8 marks the
    group in ``item._nodeid``, which pytest 9 no longer reads.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class DashboardTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "tests/dashboard" if nodeid.startswith("tests/dashboard/") else super()._split_scope(nodeid)

    return DashboardTogether(config, log)


@contextmanager
def _without_a_foreign_running_loop(item: pytest.Item) -> Iterator[None]:
    """Playwright's sync API keeps its event loop marked running in the main thread while it is started, which
    fails every asyncio test after a dashboard test ("Runner.run() cannot be called from a running event loop").
    Outside the dashboard tests nothing else leaves a loop running between tests: hide it there and put it back
    after (tests/dashboard/conftest.py marks it running again before it stops Playwright)."""
    loop = asyncio._get_running_loop()
    if loop is None or _is_dashboard(item):
        yield
        return
    asyncio._set_running_loop(None)
    try:
        yield
    finally:
        if not loop.is_closed():
            asyncio._set_running_loop(loop)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    with _without_a_foreign_running_loop(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    with _without_a_foreign_running_loop(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    with _without_a_foreign_running_loop(item):
        return (yield)
