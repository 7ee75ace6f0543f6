"""Session fixtures: real brokers on free loopback ports, started by the tests themselves."""

from __future__ import annotations

import os
from collections.abc import Iterator

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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The dashboard's browser tests run last (in their own order): their session-wide Playwright keeps an
    event loop running in the main thread while it is started, which fails every asyncio test after it."""
    items.sort(key=lambda item: item.nodeid.replace(os.sep, "/").startswith("tests/dashboard/"))
