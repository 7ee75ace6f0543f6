"""The megace topic tree: every topic string in the project is built and parsed here.

Layout (``{x}`` are ids matching ``[A-Za-z0-9_-]{1,64}``: no dots, which RabbitMQ maps to a topic level
and NATS refuses in MQTT topics)::

    megace/v1/site/{site}/device/{device}/up/{features|register|infer}     device -> edge
    megace/v1/site/{site}/device/{device}/down/{config|prediction|feedback|model|error|receipt}
                                                                            edge -> device
    megace/v1/site/{site}/down/register                                     edge -> its site's devices
    megace/v1/cloud/up/{site}/adapter                                       edge -> cloud
    megace/v1/cloud/down/global                       (retained)            cloud -> all edges
    megace/v1/cloud/down/site/{site}/feedback         (retained)            cloud -> one edge
    megace/v1/status/{device|edge}/{site}/{id}        (retained, last will) devices, edges -> dashboards
    megace/v1/status/{cloud|broker}/{id}              (retained, last will) cloud -> dashboards
    megace/v1/metrics/{device|edge}/{site}/{id}       (JSON, retained)      devices, edges -> dashboards
    megace/v1/metrics/{cloud|broker}/{id}             (JSON, retained)      cloud -> dashboards
    megace/v1/events/edge/{site}/{id}                 (JSON, retained)      one per training round
    megace/v1/events/cloud/{id}                       (JSON, retained)      one per global version

Devices and edges name their site in status, metrics and events (two sites may reuse a device id once
their brokers are bridged); ``megace/v1/status/#`` and ``megace/v1/metrics/#`` cover both layouts.

A payload too large for one packet travels as chunks on ``{topic}/chunk/{index}``
(see :mod:`broker.chunking`); :func:`subscriptions` returns the filters that cover both.
"""

from __future__ import annotations

import re

from broker.compat import StrEnum, slotted_dataclass
from broker.errors import TopicError

ROOT = "megace/v1"
_ID = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


class Uplink(StrEnum):
    """What a device sends to its edge."""

    FEATURES = "features"
    REGISTER = "register"
    INFER = "infer"


class Downlink(StrEnum):
    """What an edge sends to one device."""

    CONFIG = "config"
    PREDICTION = "prediction"
    FEEDBACK = "feedback"
    MODEL = "model"
    ERROR = "error"
    RECEIPT = "receipt"


class Role(StrEnum):
    """Who publishes a status or metrics topic."""

    DEVICE = "device"
    EDGE = "edge"
    CLOUD = "cloud"
    BROKER = "broker"


class Channel(StrEnum):
    """The kind of topic a parsed string belongs to."""

    DEVICE_UP = "device_up"
    DEVICE_DOWN = "device_down"
    ADAPTER_UP = "adapter_up"
    GLOBAL_DOWN = "global_down"
    SITE_FEEDBACK = "site_feedback"
    SITE_REQUEST = "site_request"
    STATUS = "status"
    METRICS = "metrics"
    EVENTS = "events"


def check_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it is a valid topic level id, else raise :class:`TopicError`."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise TopicError(f"invalid {what} {value!r}: must match [A-Za-z0-9_-]{{1,64}} (letters, digits, '_' and '-'; "
                         "a '.' becomes a topic level on RabbitMQ and is refused by NATS)")
    return value


def device_up(site: str, device: str, what: Uplink) -> str:
    return f"{ROOT}/site/{check_id(site, 'site')}/device/{check_id(device, 'device')}/up/{Uplink(what).value}"


def device_down(site: str, device: str, what: Downlink) -> str:
    return f"{ROOT}/site/{check_id(site, 'site')}/device/{check_id(device, 'device')}/down/{Downlink(what).value}"


def site_device_uplinks(site: str) -> str:
    """Filter an edge subscribes to: every uplink of every device of its site."""
    return f"{ROOT}/site/{check_id(site, 'site')}/device/+/up/+"


def device_downlinks(site: str, device: str) -> str:
    """Filter a device subscribes to: everything its edge sends it."""
    return f"{ROOT}/site/{check_id(site, 'site')}/device/{check_id(device, 'device')}/down/+"


def register_request(site: str) -> str:
    """Where an edge asks every device of its site to publish its registration again (not retained).

    Devices subscribe to it by its exact name: some brokers (RabbitMQ) never deliver retained messages through
    a ``+``/``#`` filter, so an edge that starts cannot rely on its wildcard seeing the retained registrations."""
    return f"{ROOT}/site/{check_id(site, 'site')}/down/register"


def adapter_up(site: str) -> str:
    return f"{ROOT}/cloud/up/{check_id(site, 'site')}/adapter"


def all_adapter_uplinks() -> str:
    return f"{ROOT}/cloud/up/+/adapter"


def global_down() -> str:
    return f"{ROOT}/cloud/down/global"


def site_feedback(site: str) -> str:
    return f"{ROOT}/cloud/down/site/{check_id(site, 'site')}/feedback"


def _dashboard(kind: str, role: Role, ident: str, site: str | None) -> str:
    """``{kind}/{role}/[{site}/]{id}``: the site level only when given (devices and edges give theirs)."""
    where = "" if site is None else f"{check_id(site, 'site')}/"
    return f"{ROOT}/{kind}/{Role(role).value}/{where}{check_id(ident)}"


def status(role: Role, ident: str, site: str | None = None) -> str:
    """Retained JSON status; without ``site`` the site-less layout (the cloud, or a pre-site publisher)."""
    return _dashboard("status", role, ident, site)


def metrics(role: Role, ident: str, site: str | None = None) -> str:
    """Retained JSON latest metrics; ``site`` as for :func:`status`."""
    return _dashboard("metrics", role, ident, site)


def events(role: Role, ident: str, site: str | None = None) -> str:
    """Retained JSON event of the last round (edge) or global version (cloud); ``site`` as for :func:`status`."""
    return _dashboard("events", role, ident, site)


def all_status() -> str:
    return f"{ROOT}/status/#"


def all_metrics() -> str:
    return f"{ROOT}/metrics/#"


def all_events() -> str:
    return f"{ROOT}/events/#"


def chunk(topic: str, index: int) -> str:
    """Topic of chunk ``index`` of a transfer whose whole payload belongs on ``topic``."""
    if index < 0:
        raise TopicError(f"negative chunk index {index}")
    return f"{topic}/chunk/{index}"


def subscriptions(topic_filter: str) -> list[str]:
    """Filters covering a topic (filter) and its chunk topics."""
    if topic_filter.endswith("#"):
        return [topic_filter]
    return [topic_filter, f"{topic_filter}/chunk/+"]


@slotted_dataclass(frozen=True)
class Parsed:
    """A topic taken apart. ``what`` is the last meaningful level (e.g. ``features``)."""

    channel: Channel
    site: str | None = None
    device: str | None = None
    role: Role | None = None
    ident: str | None = None
    what: str | None = None
    chunk_index: int | None = None

    @property
    def base(self) -> str:
        """The topic of the whole payload (without any chunk suffix)."""
        return _build(self)


def _build(p: Parsed) -> str:
    c = p.channel
    if c is Channel.DEVICE_UP:
        return device_up(p.site or "", p.device or "", Uplink(p.what))
    if c is Channel.DEVICE_DOWN:
        return device_down(p.site or "", p.device or "", Downlink(p.what))
    if c is Channel.ADAPTER_UP:
        return adapter_up(p.site or "")
    if c is Channel.GLOBAL_DOWN:
        return global_down()
    if c is Channel.SITE_FEEDBACK:
        return site_feedback(p.site or "")
    if c is Channel.SITE_REQUEST:
        return register_request(p.site or "")
    if c is Channel.STATUS:
        return status(p.role or Role.EDGE, p.ident or "", p.site)
    if c is Channel.EVENTS:
        return events(p.role or Role.EDGE, p.ident or "", p.site)
    return metrics(p.role or Role.EDGE, p.ident or "", p.site)


_PARSED: dict[str, Parsed] = {}
_PARSED_MAX = 4096
"""Cache of successful parses: a receiver sees the same few topics over and over (``Parsed`` is immutable)."""


def parse(topic: str) -> Parsed:
    """Take a concrete topic apart; raise :class:`TopicError` if it is not ours."""
    if type(topic) is str:
        parsed = _PARSED.get(topic)
        if parsed is not None:
            return parsed
        parsed = _parse(topic)
        if len(_PARSED) >= _PARSED_MAX:
            _PARSED.clear()  # bounded: a stream of distinct (e.g. hostile) topics only costs re-parsing
        _PARSED[topic] = parsed
        return parsed
    return _parse(topic)


def _parse(topic: str) -> Parsed:
    if not isinstance(topic, str) or not topic.startswith(ROOT + "/"):
        raise TopicError(f"not a megace/v1 topic: {topic!r}")
    levels = topic[len(ROOT) + 1 :].split("/")
    chunk_index: int | None = None
    # ".../chunk/<n>" only with an ASCII-decimal n of at most 9 digits (str.isdigit alone accepts "²",
    # which int() refuses): a site or device may itself be called "chunk"
    last = levels[-1]
    if len(levels) >= 2 and levels[-2] == "chunk" and last.isascii() and last.isdigit() and len(last) <= 9:
        chunk_index = int(levels[-1])
        levels = levels[:-2]
    try:
        parsed = _parse_levels(levels, chunk_index)
    except (ValueError, TopicError) as exc:
        raise TopicError(f"not a megace/v1 topic: {topic!r} ({exc})") from None
    return parsed


_DASHBOARD = {"status": Channel.STATUS, "metrics": Channel.METRICS, "events": Channel.EVENTS}


def _parse_levels(lv: list[str], chunk_index: int | None) -> Parsed:
    """The layouts of the module docstring, by length and fixed levels (no ``match``: gateways run 3.9)."""
    n = len(lv)
    head = lv[0] if lv else None
    if head == "site" and n == 6 and lv[2] == "device":
        site, device, direction, what = lv[1], lv[3], lv[4], lv[5]
        if direction == "up":
            return Parsed(Channel.DEVICE_UP, check_id(site), check_id(device), what=Uplink(what).value,
                          chunk_index=chunk_index)
        if direction == "down":
            return Parsed(Channel.DEVICE_DOWN, check_id(site), check_id(device), what=Downlink(what).value,
                          chunk_index=chunk_index)
    elif head == "site" and n == 4 and lv[2:] == ["down", "register"]:
        return Parsed(Channel.SITE_REQUEST, check_id(lv[1]), what="register", chunk_index=chunk_index)
    elif head == "cloud":
        if n == 4 and lv[1] == "up" and lv[3] == "adapter":
            return Parsed(Channel.ADAPTER_UP, check_id(lv[2]), what="adapter", chunk_index=chunk_index)
        if n == 3 and lv[1:] == ["down", "global"]:
            return Parsed(Channel.GLOBAL_DOWN, what="global", chunk_index=chunk_index)
        if n == 5 and lv[1] == "down" and lv[2] == "site" and lv[4] == "feedback":
            return Parsed(Channel.SITE_FEEDBACK, check_id(lv[3]), what="feedback", chunk_index=chunk_index)
    elif head in _DASHBOARD and n in (3, 4):
        site = check_id(lv[2], "site") if n == 4 else None
        return Parsed(_DASHBOARD[head], site, role=Role(lv[1]), ident=check_id(lv[-1]), chunk_index=chunk_index)
    raise TopicError("unknown layout")
