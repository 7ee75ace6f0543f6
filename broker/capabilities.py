"""What each broker of the test matrix carries, as measured here (``tests/broker/test_matrix.py`` probes
every row against the real broker, so a row that stops being true fails a test).

Why a table: megace must not silently depend on a feature one of its brokers lacks. It uses none of the
missing ones for correctness: registrations are re-requested by a non-retained site-wide request when an
edge (re)subscribes (no retained delivery through ``+``/``#``), retained globals and feedback are read on
exact topics (their chunks too), and MQTT 5 / ``$share`` are used only where ``mqtt5`` says so, with MQTT
3.1.1 everywhere else.

What degrades, deliberately: a dashboard (``megace top``, the web page) reads ``status/#``, ``metrics/#`` and
``events/#`` through wildcards. On a broker without ``retained_via_wildcard`` one opened after the fleet
started shows each member from its next publication on (metrics every few seconds; status on its next change
or last will), not at once; nothing but the dashboard's first seconds depends on it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from broker.address import ENV_PREFIX, BrokerAddress
from broker.protocol import DEFAULT_PROTOCOL, V311, check_protocol


@dataclass(frozen=True)
class BrokerCapabilities:
    """Features that differ between MQTT brokers megace runs on."""

    name: str
    mqtt5: bool
    """Accepts MQTT 5 CONNECT (session expiry, shared subscriptions of v5)."""
    shared_subscriptions: bool
    """``$share/{group}/{filter}`` splits messages between a group's subscribers."""
    retained_via_wildcard: bool
    """A new subscription with ``+``/``#`` receives the retained messages it matches (exact ones always do)."""
    version: str
    """The Debian package version the row was measured on."""

    @property
    def address_protocol(self) -> str | None:
        """The ``protocol=`` that addresses of a broker of this kind started by megace carry.

        ``3.1.1`` where the broker has no MQTT 5: an ``auto`` client would otherwise spend a probe (and, on
        amqtt, which never answers an MQTT 5 CONNECT with a will, its 5 s timeout) to learn what this row
        already says. None where it has MQTT 5: the client's own setting (``auto`` by default) applies."""
        return None if self.mqtt5 else V311


MATRIX: dict[str, BrokerCapabilities] = {
    "mosquitto": BrokerCapabilities("mosquitto", mqtt5=True, shared_subscriptions=True,
                                    retained_via_wildcard=True, version="2.0.11"),
    "embedded": BrokerCapabilities("embedded", mqtt5=False, shared_subscriptions=False,
                                   retained_via_wildcard=True, version="amqtt 0.12.1"),
    "nats": BrokerCapabilities("nats", mqtt5=False, shared_subscriptions=False,
                               retained_via_wildcard=True, version="2.9.10"),
    "rabbitmq": BrokerCapabilities("rabbitmq", mqtt5=False, shared_subscriptions=False,
                                   retained_via_wildcard=False, version="3.10.8"),
}


def capabilities(name: str) -> BrokerCapabilities:
    """The row of broker ``name``; a clear error for a broker not in the matrix."""
    try:
        return MATRIX[name]
    except KeyError:
        raise KeyError(f"broker {name!r} is not in the matrix ({', '.join(sorted(MATRIX))})") from None


def started_protocol(name: str, env: Mapping[str, str] | None = None) -> str:
    """The protocol of the addresses a broker of kind ``name`` that megace started itself hands out.

    The matrix row's (:attr:`BrokerCapabilities.address_protocol`), so a broker known to lack MQTT 5 is never
    probed for it; where the row has MQTT 5, ``MEGACE_BROKER_PROTOCOL`` (in ``env``, default ``os.environ``)
    or the default, as for a broker URL without ``protocol=``."""
    env = os.environ if env is None else env
    return capabilities(name).address_protocol or check_protocol(env.get(ENV_PREFIX + "PROTOCOL") or DEFAULT_PROTOCOL)


def started_address(name: str, host: str, port: int, *, alternates: tuple[tuple[str, int], ...] = ()) -> BrokerAddress:
    """The plain (anonymous, no TLS) address of a broker of kind ``name`` that megace started: a runner's."""
    return BrokerAddress(host, port, alternates=alternates, protocol=started_protocol(name))


class StartedBroker:
    """A runner's ``address`` and ``url`` for a broker of kind :attr:`KIND` known to lack MQTT 5 (its matrix row):
    both say ``protocol=3.1.1``, the URL even where that is the default, so that no reader's environment (or
    ``auto`` probe, which amqtt would make wait 5 s) asks it for MQTT 5."""

    KIND: str
    host: str
    port: int

    @property
    def address(self) -> BrokerAddress:
        return started_address(self.KIND, self.host, self.port)

    @property
    def url(self) -> str:
        return self.address.url(pin_protocol=True)
