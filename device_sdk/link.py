"""How a device's paho client is built: the one place that turns a ``BrokerAddress`` into a connection.

Why its own module: credentials, TLS and the session settings that make store-and-forward work
(MQTT 3.1.1, a persistent session so QoS 1 downlinks queue while the device is away, a retained
last will) must be the same on every reconnect, and security changes belong here, not in the
publishing logic.
"""

from __future__ import annotations

import socket
from typing import Any

import paho.mqtt.client as mqtt

from broker.address import BrokerAddress
from broker.protocol import V5, connect_properties


def paho_client(address: BrokerAddress, client_id: str, *, will: tuple[str, bytes], max_inflight: int,
                version: str = "3.1.1") -> mqtt.Client:
    """A fresh paho client (not yet connected) with ``address``'s credentials and TLS and a retained will.

    ``version`` is what :class:`broker.protocol.Negotiator` chose; MQTT 5's session flags go with the
    connect call (:func:`connect_args`), 3.1.1's with the client."""
    if version == V5:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    else:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                        clean_session=False)
    if address.username:
        c.username_pw_set(address.username, address.password)
    if address.tls:
        c.tls_set_context(address.ssl_context())
    c.will_set(*will, qos=1, retain=True)
    c.max_inflight_messages_set(max_inflight)
    return c


def connect_args(address: BrokerAddress, version: str) -> dict[str, Any]:
    """``connect()``'s session arguments: MQTT 5 resumes the session (``clean_start=False``), which the broker
    keeps ``address.session_expiry`` seconds after the device left; 3.1.1 needs none (``clean_session=False``)."""
    if version != V5:
        return {}
    return {"clean_start": False, "properties": connect_properties(False, address.session_expiry)}


def set_nodelay(client: mqtt.Client) -> None:
    """Disable Nagle on the client's socket: request/response waits behind delayed ACKs otherwise (~40 ms)."""
    sock = client.socket()
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
