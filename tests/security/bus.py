"""The security tests' deployment, an oracle of who may do what written from the spec, and bus helpers.

The oracle (:func:`may_write`, :func:`may_read`) parses topics with :mod:`broker.topics` and states
the intended policy directly; it does not reuse the provisioning rules it checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from pathlib import Path

import aiomqtt

from broker import topics
from broker.address import BrokerAddress
from broker.aio import make_client
from broker.exact_chunks import ExactChunks
from broker.topics import Channel, Downlink, Uplink
from megace.provision import Identity, Role
from megace.provision.static import hash_password, new_password

SITES = {"site-0": ["d0a", "d0b"], "site-1": ["d1a"]}
EDGES = {"site-0": "e0", "site-1": "e1"}
D0A = Identity(Role.DEVICE, "d0a", "site-0")
D0B = Identity(Role.DEVICE, "d0b", "site-0")
D1A = Identity(Role.DEVICE, "d1a", "site-1")
E0 = Identity(Role.EDGE, "e0", "site-0")
E1 = Identity(Role.EDGE, "e1", "site-1")
C0 = Identity(Role.CONTROL, "e0", "site-0")
"""Edge e0's control connection: the edge's grants, but of its site's uplinks only inference requests."""
CLOUD = Identity(Role.CLOUD, "cloud")
DASH = Identity(Role.DASHBOARD, "ops")
ACTORS = [D0A, D1A, E0, E1, C0, CLOUD, DASH]
ROOT_USER = "megace-test-root"
"""A test-only superuser (read/write ``#``) that observes and injects; never part of the shipped files."""


def deployment() -> list[Identity]:
    out = [Identity(Role.DEVICE, d, s) for s, ds in SITES.items() for d in ds]
    out += [Identity(Role.EDGE, e, s) for s, e in EDGES.items()]
    return [*out, C0, CLOUD, DASH]


def universe() -> list[str]:
    """Concrete topics of every kind, for every identity, plus a device name reused in another site."""
    t: list[str] = []
    for s, d in [(s, d) for s, ds in SITES.items() for d in ds] + [("site-1", "d0a")]:
        t += [topics.device_up(s, d, u) for u in Uplink]
        t.append(topics.chunk(topics.device_up(s, d, Uplink.FEATURES), 0))
        t += [topics.device_down(s, d, w) for w in (Downlink.CONFIG, Downlink.PREDICTION, Downlink.MODEL)]
        t.append(topics.chunk(topics.device_down(s, d, Downlink.MODEL), 3))
    for s in SITES:
        t += [topics.adapter_up(s), topics.chunk(topics.adapter_up(s), 0)]
        t += [topics.site_feedback(s), topics.chunk(topics.site_feedback(s), 1), topics.register_request(s)]
    t += [topics.global_down(), topics.chunk(topics.global_down(), 2)]
    ids: list[tuple[topics.Role, str, str | None]] = [(topics.Role.DEVICE, d, s) for s, ds in SITES.items() for d in ds]
    ids += [(topics.Role.EDGE, e, s) for s, e in EDGES.items()]
    ids += [(topics.Role.DEVICE, "d0a", "site-1"), (topics.Role.EDGE, "e0", "site-1")]  # a name in another site
    ids += [(topics.Role.DEVICE, "d0a", None), (topics.Role.EDGE, "e0", None)]  # the pre-site layout
    ids += [(topics.Role.CLOUD, "cloud", None), (topics.Role.BROKER, "b1", None)]
    for role, ident, site in ids:
        t += [topics.status(role, ident, site), topics.metrics(role, ident, site), topics.events(role, ident, site)]
    t += ["megace/v1/unknown/x", "megace/v2/site/site-0/device/d0a/up/features", "other/topic"]
    return t


def _parse(topic: str) -> topics.Parsed | None:
    try:
        return topics.parse(topic)
    except topics.TopicError:
        return None


def may_write(ident: Identity, topic: str) -> bool:
    p = _parse(topic)
    if p is None:
        return False
    if p.channel in (Channel.STATUS, Channel.METRICS, Channel.EVENTS):
        # under its own name and, for devices and edges, its own site (events: edges and the cloud only)
        if p.channel is Channel.EVENTS and ident.role is Role.DEVICE:
            return False
        as_role = Role.EDGE if ident.role is Role.CONTROL else ident.role  # the control connection speaks as its edge
        return (p.role is not None and p.role.value == as_role.value and p.ident == ident.name
                and p.site == ident.site)
    if ident.role is Role.DEVICE:
        return p.channel is Channel.DEVICE_UP and (p.site, p.device) == (ident.site, ident.name)
    if ident.role in (Role.EDGE, Role.CONTROL):
        return p.channel in (Channel.DEVICE_DOWN, Channel.ADAPTER_UP, Channel.SITE_REQUEST) and p.site == ident.site
    if ident.role is Role.CLOUD:
        return p.channel in (Channel.GLOBAL_DOWN, Channel.SITE_FEEDBACK)
    return False


def may_read(ident: Identity, topic: str) -> bool:
    p = _parse(topic)
    if p is None:
        return False
    if ident.role is Role.DEVICE:
        return ((p.channel is Channel.DEVICE_DOWN and (p.site, p.device) == (ident.site, ident.name))
                or (p.channel is Channel.SITE_REQUEST and p.site == ident.site))  # its edge's "register again"
    if ident.role is Role.EDGE:
        return (p.channel is Channel.GLOBAL_DOWN
                or (p.channel in (Channel.DEVICE_UP, Channel.SITE_FEEDBACK) and p.site == ident.site))
    if ident.role is Role.CONTROL:
        return (p.channel is Channel.GLOBAL_DOWN
                or (p.channel is Channel.SITE_FEEDBACK and p.site == ident.site)
                or (p.channel is Channel.DEVICE_UP and p.site == ident.site and p.what == "infer"))
    if ident.role is Role.CLOUD:
        return p.channel is Channel.ADAPTER_UP
    if ident.role is Role.DASHBOARD:
        return p.channel in (Channel.STATUS, Channel.METRICS, Channel.EVENTS)
    return False


def code_filters(ident: Identity) -> list[str]:
    """The filters megace's own code subscribes with for this role (they must be granted)."""
    if ident.role is Role.DEVICE:
        return [*topics.subscriptions(topics.device_downlinks(ident.site or "", ident.name)),
                topics.register_request(ident.site or "")]
    if ident.role is Role.EDGE:
        s = ident.site or ""
        return [*topics.subscriptions(topics.site_device_uplinks(s)), *topics.subscriptions(topics.global_down()),
                *topics.subscriptions(topics.site_feedback(s)),
                *ExactChunks([topics.global_down(), topics.site_feedback(s)]).filters()]  # what the edge uses
    if ident.role is Role.CONTROL:
        s = ident.site or ""
        return [f"megace/v1/site/{s}/device/+/up/infer", f"megace/v1/site/{s}/device/+/up/infer/chunk/+",
                *topics.subscriptions(topics.global_down()), *topics.subscriptions(topics.site_feedback(s)),
                *ExactChunks([topics.global_down(), topics.site_feedback(s)]).filters()]
    if ident.role is Role.CLOUD:
        return topics.subscriptions(topics.all_adapter_uplinks())
    return [topics.all_status(), topics.all_metrics(), topics.all_events()]


WILDCARDS = ["#", "megace/#", "megace/v1/#", "megace/v1/site/+/device/+/up/+", "megace/v1/site/+/device/+/down/#",
             "megace/v1/site/site-0/#", "megace/v1/site/site-1/#", "megace/v1/cloud/#", "megace/v1/cloud/up/+/adapter",
             "megace/v1/status/#", "megace/v1/metrics/+/+", "+/+/+/+/+/+/+", "+/#"]


# ---------------------------------------------------------------- the test-only superuser
def grant_root(broker_dir: Path) -> str:
    """Add :data:`ROOT_USER` to the broker files of a provisioning folder; returns its password.

    Call again after anything rewrites the files (``Store.add`` / ``Store.revoke``).
    """
    password = "root-" + new_password()
    with (broker_dir / "megace.passwd").open("a") as f:
        f.write(f"{ROOT_USER}:{hash_password(password)}\n")
    with (broker_dir / "megace.acl").open("a") as f:
        f.write(f"\nuser {ROOT_USER}\ntopic readwrite #\n")
    doc = json.loads((broker_dir / "dynamic-security.json").read_text())
    _, _, iterations, salt, digest = hash_password(password).split("$")
    doc["clients"].append({"username": ROOT_USER, "password": digest, "salt": salt, "iterations": int(iterations),
                           "roles": [{"rolename": "test-root"}]})
    doc["roles"].append({"rolename": "test-root", "acls": [
        {"acltype": t, "topic": "#", "priority": 0, "allow": True}
        for t in ("publishClientSend", "publishClientReceive", "subscribePattern")]})
    (broker_dir / "dynamic-security.json").write_text(json.dumps(doc))
    return password


def tag() -> str:
    return uuid.uuid4().hex[:12]


async def collect(client: aiomqtt.Client, into: list[tuple[str, bytes]]) -> None:
    async for msg in client.messages:
        into.append((str(msg.topic), bytes(msg.payload) if isinstance(msg.payload, (bytes, bytearray)) else b""))


async def wait_for(pred: object, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():  # type: ignore[operator]
        if loop.time() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.01)


def _utf8(text: str) -> bytes:
    raw = text.encode()
    return len(raw).to_bytes(2, "big") + raw


def _packet(kind: int, body: bytes) -> bytes:
    out, n = bytearray([kind]), len(body)
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out) + body


async def publish_denied(address: BrokerAddress, topic: str, payload: bytes) -> None:
    """Connect, publish once at QoS 1, wait for the PUBACK or the broker closing the connection.

    One connection per denied publish: Mosquitto 2.0.11 closes the connection of a client whose
    PUBLISH it denied (QoS 0 and 1; to a 3.1.1 client it first sends a PUBACK carrying reason code
    135), so nothing may follow in the same session. A plain MQTT 3.1.1 exchange over TLS: a
    paho/aiomqtt client per topic costs ten times as much, for hundreds of cases.
    """
    flags = 0x02 | (0x80 if address.username else 0) | (0x40 if address.password else 0)
    body = _utf8("MQTT") + bytes([4, flags]) + (30).to_bytes(2, "big") + _utf8(address.username or "x")
    body += (_utf8(address.username) if address.username else b"") + (_utf8(address.password) if address.password
                                                                       else b"")
    reader, writer = await asyncio.open_connection(address.host, address.port, ssl=address.ssl_context(),
                                                   server_hostname=address.host)
    try:
        writer.write(_packet(0x10, body))
        connack = await asyncio.wait_for(reader.readexactly(4), 5)
        assert connack[0] == 0x20 and connack[3] == 0, f"{address.username} refused: {connack!r}"
        writer.write(_packet(0x32, _utf8(topic) + (1).to_bytes(2, "big") + payload))
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await asyncio.wait_for(reader.readexactly(2), 5)  # PUBACK, or the broker hanging up
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def connect_error(address: BrokerAddress) -> str:
    """Connect with aiomqtt and publish once (QoS 1): ``"connected"``, or the error aiomqtt gave."""
    try:
        async with make_client(address, identifier=address.username or "anon") as c:
            await c.publish(topics.metrics(topics.Role.BROKER, "probe"), b"x", qos=1, timeout=3)
    except aiomqtt.MqttError as exc:
        return str(exc)
    return "connected"
