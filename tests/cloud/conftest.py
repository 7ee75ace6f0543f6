"""PostgreSQL for the replicated ledger's tests: one private cluster per session, one fresh database per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from megace_common.postgres import PostgresServer


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A cluster of the tests' own on a free loopback port (Debian's ``postgresql``), never the machine's server."""
    with PostgresServer() as pg:
        yield pg


@pytest.fixture
def pg_url(postgres: PostgresServer) -> str:
    """An empty database: a ledger of the test's own."""
    return postgres.create_database()
