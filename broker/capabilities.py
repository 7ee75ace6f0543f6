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

from dataclasses import dataclass


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
