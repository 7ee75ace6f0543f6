"""Which MQTT protocol version a client speaks: the one place that decides, falls back and remembers.

Why: MQTT 5 brings session expiry (a durable session that the broker forgets after a while instead of
never) and shared subscriptions (``$share/<group>/<filter>``: each message goes to one member of the
group, so several inference workers split a site's requests). Mosquitto 2.0 has both; the embedded
amqtt broker, RabbitMQ 3.10 and NATS 2.9 speak 3.1.1 only. RabbitMQ and NATS *acknowledge* a
``$share/...`` subscription and deliver nothing, so a shared subscription is only ever made on a
connection the broker accepted as MQTT 5.

The setting (``protocol=`` in the broker URL, ``MEGACE_BROKER_PROTOCOL``, or ``--protocol``):

* ``5``: MQTT 5 only; a broker that refuses it is a connection failure (retried with backoff);
* ``3.1.1`` (the default, :data:`DEFAULT_PROTOCOL`): MQTT 3.1.1 only (durable sessions never expire);
* ``auto``: try MQTT 5; when the broker refuses it (CONNACK
  "unsupported protocol version", return code 1 in 3.1.1 terms, 0x84 in MQTT 5 terms, which is what amqtt
  and NATS answer; a connection closed during CONNECT, what a strict 3.1.1 broker may do; or no CONNACK at
  all within the address's timeout, what amqtt does with an MQTT 5 CONNECT that carries a will or
  properties), fall back to 3.1.1 at once and keep it for every reconnect of this client. Once MQTT 5 was
  accepted it is kept too: a later failure is an outage, never a reason to downgrade.

:class:`Negotiator` is one client's memory of that choice; it counts ``mqtt_protocol.5`` /
``mqtt_protocol.3.1.1`` (connections per version), ``protocol_fallbacks`` and sets the gauge
``mqtt_v5`` (1 or 0), and logs the version once per change.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from broker.metrics import Counters

# paho and aiomqtt are imported where used: broker.address (standard library only, gateways' Python 3.9
# without paho included) imports this module for its settings
if TYPE_CHECKING:  # aiomqtt is the services' client; the device SDK (paho only) imports this module too
    import aiomqtt
    from paho.mqtt.properties import Properties

    from broker.address import BrokerAddress as BrokerAddressLike  # address imports this module

log = logging.getLogger(__name__)

AUTO = "auto"
V5 = "5"
V311 = "3.1.1"
PROTOCOLS = (AUTO, V5, V311)
DEFAULT_PROTOCOL = V311
"""What a client speaks when nothing says otherwise: 3.1.1, which every broker megace supports carries.

Not ``auto``, measured: paho builds an MQTT 5 ``Properties`` object for every message it receives, and an
edge's inline ingest fell from 0.37x to 0.23x a bare subscriber's rate on MQTT 5 (``bench/bench_edge.py
--only ingest``, the same run with ``MEGACE_BROKER_PROTOCOL=3.1.1`` and without). Ask for ``auto`` (or
``5``) where MQTT 5 pays: inference workers' shared subscriptions, expiring sessions.

The brokers megace starts itself say which in their addresses (:func:`broker.capabilities.started_protocol`):
the embedded amqtt broker's, NATS's and RabbitMQ's carry ``protocol=3.1.1``, so no client probes them
(amqtt never answers an MQTT 5 CONNECT that carries a will or properties: each durable client would wait
out :func:`probe_v5`'s 5 s, and ``megace run`` took 70 s instead of 25 s before its addresses said so).
Costs on an MQTT 5 broker reached with ``auto``: one probe connection per durable client's first connect,
and durable sessions that expire (:data:`DEFAULT_SESSION_EXPIRY_S`, a day) instead of never."""
DEFAULT_SESSION_EXPIRY_S = 86_400
"""MQTT 5 only: how long the broker keeps a durable session (its subscriptions and queued QoS 1
messages) after the client went away. One day covers a restart, an upgrade or a night's outage;
3.1.1 has no such bound (the session lives until the client returns or the broker's own
``persistent_client_expiration``)."""
MAX_SESSION_EXPIRY_S = 0xFFFFFFFF
"""MQTT 5's largest value, which means "never expires"."""

REFUSED_CODES = frozenset({1, 0x84})
"""CONNACK codes meaning "not this protocol version": 3.1.1's 1, MQTT 5's 0x84 (paho reports both as 0x84)."""
CLOSED_DURING_CONNECT = "connection closed during CONNECT"
"""The error :func:`watch_connect` raises when the broker hangs up before any CONNACK."""
NO_CONNACK = "Operation timed out"
"""aiomqtt 2.5's error when no CONNACK came within the client's timeout. Before any broker accepted MQTT 5
(:class:`Negotiator` checks), it is taken as a refusal, the verdict :func:`probe_v5` gives a silent broker:
amqtt never answers an MQTT 5 CONNECT with a will (every megace service sends one), and without this an
``auto`` client with a clean session retried MQTT 5 forever there (``megace run``'s embedded broker)."""


class ProtocolSettingError(ValueError):
    """A protocol or session-expiry setting that is not one of the allowed values."""


def check_protocol(value: object) -> str:
    """``value`` as one of :data:`PROTOCOLS` (``"5.0"``, ``"v5"``, ``"311"`` accepted); else raise."""
    text = str(value).strip().lower().removeprefix("v").removeprefix("mqtt")
    text = {"5.0": V5, "311": V311, "3": V311, "4": V311}.get(text, text)
    if text not in PROTOCOLS:
        raise ProtocolSettingError(f"protocol {value!r}: must be one of {', '.join(PROTOCOLS)}")
    return text


def check_session_expiry(value: object) -> int:
    """Session expiry in whole seconds, 0 to 2**32 - 1 (the MQTT 5 range); else raise."""
    try:
        seconds = int(str(value))
    except ValueError:
        raise ProtocolSettingError(f"session expiry {value!r}: not a whole number of seconds") from None
    if not 0 <= seconds <= MAX_SESSION_EXPIRY_S:
        raise ProtocolSettingError(f"session expiry {seconds}: must be 0 to {MAX_SESSION_EXPIRY_S} seconds")
    return seconds


def reason_value(reason: Any) -> int | None:
    """The numeric value of a paho ``ReasonCode`` or a plain return code; None for anything else."""
    value = getattr(reason, "value", reason)
    return value if isinstance(value, int) else None


def is_version_refusal(exc: BaseException) -> bool:
    """True when a failed aiomqtt connect says "this broker does not speak the version asked for"."""
    import aiomqtt
    from aiomqtt.exceptions import MqttConnectError

    if isinstance(exc, MqttConnectError):
        return reason_value(getattr(exc, "rc", None)) in REFUSED_CODES
    return isinstance(exc, aiomqtt.MqttError) and str(exc) in (CLOSED_DURING_CONNECT, NO_CONNACK)


def connect_properties(clean: bool, session_expiry: int) -> Properties | None:
    """MQTT 5 CONNECT properties: a durable session outlives the connection by ``session_expiry`` seconds;
    a clean one sends none (expiry 0 is MQTT 5's default).

    Sending none matters: amqtt, asked for MQTT 5 with CONNECT properties, misreads the packet and never
    answers (the client times out), while a property-less MQTT 5 CONNECT gets its clear refusal."""
    if clean:
        return None
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = session_expiry
    return props


def probe_v5(address: BrokerAddressLike, client_id: str, timeout: float = 5.0) -> bool | None:
    """Ask the broker whether it speaks MQTT 5, before a durable session's first MQTT 5 connect.

    True: it accepted; False: it refused the version, hung up during CONNECT, or gave no CONNACK within
    ``timeout`` to a CONNECT with properties (what amqtt does); None: no verdict (unreachable, not
    authorized). Blocking (paho): the asyncio services run it in an executor.

    The probe is the real session's own connect, made harmless: ``client_id`` is the real one, because a
    broker may replace any client id by the user name (Mosquitto's ``use_username_as_clientid``, megace's
    secure set-up) and a throw-away clean session would then wipe the real one. So the probe resumes the
    session (``Clean Start=0``, the real expiry), acknowledges nothing (queued messages it is handed stay
    in flight and are sent again to the real connection) and leaves with a normal DISCONNECT.
    """
    import threading

    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5,
                         manual_ack=True)
    if address.username:
        client.username_pw_set(address.username, address.password)
    context = address.ssl_context()
    if context is not None:
        client.tls_set_context(context)
    answers: list[Any] = []
    done = threading.Event()

    def on_connect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        answers.append(reason)
        done.set()

    def on_disconnect(_c: Any, _u: Any, _f: Any, _reason: Any, _p: Any) -> None:
        answers.append(None)  # before any CONNACK: the broker hung up on the CONNECT
        done.set()

    client.on_connect, client.on_disconnect = on_connect, on_disconnect
    try:
        client.connect(address.host, address.port, keepalive=address.keepalive, clean_start=False,
                       properties=connect_properties(False, address.session_expiry))
    except (OSError, ValueError):
        return None
    client.loop_start()
    try:
        done.wait(timeout)
    finally:
        client.disconnect()
        client.loop_stop()
    if not answers or answers[0] is None:
        return False  # connected, and the broker never answered the MQTT 5 CONNECT, or hung up on it
    first = answers[0]
    if not first.is_failure:
        return True
    return False if reason_value(first) in REFUSED_CODES else None


def paho_clean_options(setting: str) -> dict[str, Any]:
    """paho ``Client`` arguments for a short-lived clean-session observer (``megace run``'s monitor, the
    retained clean-up).

    ``auto`` speaks 3.1.1 there, without probing: a clean session gains nothing from MQTT 5 (no session to
    expire, no shared subscription) and every broker megace supports carries 3.1.1. ``5`` is honoured."""
    import paho.mqtt.client as mqtt

    if check_protocol(setting) == V5:
        return {"protocol": mqtt.MQTTv5}  # paho refuses clean_session with v5; its clean_start defaults to clean
    return {"protocol": mqtt.MQTTv311, "clean_session": True}


def aiomqtt_options(version: str, *, clean_session: bool, session_expiry: int) -> dict[str, Any]:
    """The session arguments of ``aiomqtt.Client`` for ``version``.

    MQTT 5: ``clean_start`` is given explicitly (aiomqtt's default, "clean on the first connect only",
    would start clean on every attempt, since megace builds a fresh client per attempt).
    """
    import aiomqtt

    if version == V311:
        return {"protocol": aiomqtt.ProtocolVersion.V311, "clean_session": clean_session}
    return {"protocol": aiomqtt.ProtocolVersion.V5, "clean_start": clean_session,
            "properties": connect_properties(clean_session, session_expiry)}


def watch_connect(client: aiomqtt.Client) -> aiomqtt.Client:
    """Make a connection closed before CONNACK fail the connect at once with :data:`CLOSED_DURING_CONNECT`.

    aiomqtt 2.5 ignores a disconnect that comes before the CONNACK and waits for its timeout (10 s),
    then says "Operation timed out", which is no evidence of a refused protocol version.
    """
    import aiomqtt

    paho = client._client
    chained = paho.on_disconnect

    def on_disconnect(c: Any, userdata: Any, flags: Any, reason: Any, properties: Any = None) -> None:
        connected = client._connected
        if not connected.done():
            connected.set_exception(aiomqtt.MqttError(CLOSED_DURING_CONNECT))
        chained(c, userdata, flags, reason, properties)

    paho.on_disconnect = on_disconnect
    return client


class Negotiator:
    """One client's protocol choice across its reconnects (see the module docstring).

    Call :meth:`refused` when a connect failed before the session started (True: retry now, with the
    version :attr:`version` now names) and :meth:`connected` when the broker accepted it.
    """

    def __init__(self, setting: str = DEFAULT_PROTOCOL, *, name: str = "", counters: Counters | None = None) -> None:
        self.setting = check_protocol(setting)
        self.name = name
        self.counters = counters if counters is not None else Counters()
        self.version = V311 if self.setting == V311 else V5
        """The version the next connect tries (and, once :attr:`confirmed`, the one in use)."""
        self.confirmed = False
        """True once a broker accepted :attr:`version` (auto never changes its mind after that)."""
        self._logged: str | None = None

    @property
    def v5(self) -> bool:
        """True when the connection in use (or about to be tried) is MQTT 5."""
        return self.version == V5

    def refused(self, why: str) -> bool:
        """The broker refused MQTT 5 (``why`` says how): fall back to 3.1.1 if the setting is ``auto``."""
        if self.setting != AUTO or self.version != V5 or self.confirmed:
            return False
        self.version = V311
        self.counters.inc("protocol_fallbacks")
        log.warning("%s: the broker refused MQTT 5 (%s); using MQTT 3.1.1 from now on "  # pragma: no mutate
                    "(no session expiry, no shared subscriptions)", self.name, why)  # pragma: no mutate
        return True

    def refused_by(self, exc: BaseException) -> bool:
        """:meth:`refused` when ``exc`` (a failed aiomqtt connect) is a protocol-version refusal."""
        return is_version_refusal(exc) and self.refused(str(exc) or type(exc).__name__)

    @property
    def undecided(self) -> bool:
        """``auto`` that no broker has answered yet: a durable session probes first (:func:`probe_v5`)."""
        return self.setting == AUTO and self.version == V5 and not self.confirmed

    def probed(self, verdict: bool | None) -> None:
        """Take :func:`probe_v5`'s verdict: True confirms MQTT 5, False falls back, None decides nothing."""
        if verdict is True:
            self.confirmed = True
        elif verdict is False:
            self.refused("a probe connection was refused")

    def refused_code(self, reason: Any) -> bool:
        """:meth:`refused` when a CONNACK ``reason`` (paho's ``ReasonCode`` or an int) refuses the version."""
        return reason_value(reason) in REFUSED_CODES and self.refused(f"CONNACK {reason}")

    def connected(self) -> None:
        """The broker accepted :attr:`version`: remember it, count it, log it when it changed."""
        self.confirmed = True
        self.counters.inc(f"mqtt_protocol.{self.version}")
        self.counters.set("mqtt_v5", 1.0 if self.v5 else 0.0)
        if self._logged != self.version:
            self._logged = self.version
            log.info("%s: speaking MQTT %s (setting %s)", self.name, self.version, self.setting)  # pragma: no mutate


__all__ = [
    "AUTO", "CLOSED_DURING_CONNECT", "DEFAULT_PROTOCOL", "DEFAULT_SESSION_EXPIRY_S", "NO_CONNACK", "PROTOCOLS", "V5",
    "V311", "Negotiator", "ProtocolSettingError", "aiomqtt_options", "check_protocol", "check_session_expiry",
    "connect_properties", "is_version_refusal", "paho_clean_options", "probe_v5", "watch_connect",
]
