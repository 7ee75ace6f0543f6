"""A provisioned deployment (two sites, a cloud, a dashboard) and secure brokers built from it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.address import BrokerAddress
from broker.runners.secure import SecureMosquitto
from megace.provision.store import Store
from tests.security.bus import ROOT_USER, deployment, grant_root


@pytest.fixture(scope="session")
def provisioned(tmp_path_factory: pytest.TempPathFactory) -> Store:
    store = Store.init(tmp_path_factory.mktemp("pki") / "bus", ["localhost"])
    for ident in deployment():
        store.add(ident, signing_key=ident.role.value in ("edge", "cloud"))
    return store


class Bus:
    """A running secure broker plus its superuser's address (observer and injector)."""

    def __init__(self, broker: SecureMosquitto, root_password: str) -> None:
        self.broker = broker
        self.root_password = root_password

    def root(self) -> BrokerAddress:
        a = self.broker.store.address(self.broker.store.admin_username, mtls=False, host=self.broker.host)
        return BrokerAddress(a.host, self.broker.password_port, True, a.ca_file, ROOT_USER, self.root_password)

    def address(self, username: str, *, mtls: bool) -> BrokerAddress:
        return self.broker.address(username, mtls=mtls)


@pytest.fixture(scope="module", params=["static", "dynsec"])
def bus(request: pytest.FixtureRequest, provisioned: Store) -> Iterator[Bus]:
    """One broker per set-up, shared by a module's tests (nothing here changes its identities)."""
    password = grant_root(provisioned.broker_dir)
    with SecureMosquitto(provisioned, mode=request.param) as broker:
        yield Bus(broker, password)
    provisioned.write_broker_files()  # drop the superuser again


@pytest.fixture
def own_store(tmp_path: Path) -> Store:
    """A deployment of the test's own, for tests that revoke or rotate."""
    store = Store.init(tmp_path / "bus", ["localhost"])
    for ident in deployment():
        store.add(ident)
    return store
