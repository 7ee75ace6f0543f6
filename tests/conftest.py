"""Session fixtures: real brokers on free loopback ports, started by the tests themselves."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from broker.address import BrokerAddress
from broker.runners import EmbeddedBroker, MosquittoBroker


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
    return BrokerAddress(embedded_broker.host, embedded_broker.port)


@pytest.fixture(params=["mosquitto", "embedded"])
def any_broker(request: pytest.FixtureRequest) -> BrokerAddress:
    """Run a test against both brokers megace ships support for."""
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
