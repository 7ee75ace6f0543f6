"""The ACL matrix on a real Mosquitto with the provisioned files: every role, every topic, both set-ups.

For each actor (a device per site, an edge per site, the cloud, a dashboard) and both listeners
(client certificate, password): every topic of :func:`universe` it may publish arrives, every other
one does not; every topic it may read is delivered to it, nothing else is, whatever filter it
tries. Denied publishes are checked through a superuser subscriber, bounded by a marker the
superuser publishes after the actor's publish was acknowledged or its connection dropped.
"""

from __future__ import annotations

import asyncio
import contextlib

import aiomqtt
import pytest

from broker.aio import make_client
from megace.provision import Identity
from tests.security.bus import (
    ACTORS,
    C0,
    CLOUD,
    D0A,
    D0B,
    D1A,
    DASH,
    E0,
    E1,
    WILDCARDS,
    code_filters,
    collect,
    may_read,
    may_write,
    publish_denied,
    tag,
    universe,
    wait_for,
)
from tests.security.conftest import Bus

LISTENERS = [pytest.param(True, id="mtls"), pytest.param(False, id="password")]
MARKER = "megace/v1/test/marker"


@pytest.mark.parametrize("mtls", LISTENERS)
async def test_publish_matrix(bus: Bus, mtls: bool) -> None:
    """Allowed publishes arrive; each forbidden one (other role, site, device, off-tree) is dropped."""
    got: list[tuple[str, bytes]] = []
    run = tag()
    async with make_client(bus.root(), identifier="observer") as obs:
        await obs.subscribe("#", qos=1)
        task = asyncio.create_task(collect(obs, got))
        expected: dict[str, set[str]] = {}

        async def denied(actor: Identity) -> None:
            # one identity's connections in sequence: a second connection under the same client id
            # would end the first before its publish was judged
            addr = bus.address(actor.username, mtls=mtls)
            for t in universe():
                if not may_write(actor, t):
                    await publish_denied(addr, t, f"{run}|{actor.username}".encode())
            for t in expected[actor.username]:  # control: the same raw client gets allowed topics through
                await publish_denied(addr, t, f"{run}|raw|{actor.username}".encode())
                break

        for actor in ACTORS:
            allowed = [t for t in universe() if may_write(actor, t)]
            expected[actor.username] = set(allowed)
            assert allowed or actor is DASH
            async with make_client(bus.address(actor.username, mtls=mtls), identifier=actor.client_id) as c:
                for t in allowed:
                    await c.publish(t, f"{run}|{actor.username}".encode(), qos=1)
        await asyncio.gather(*(denied(actor) for actor in ACTORS))
        await obs.publish(MARKER, run.encode(), qos=1)
        await wait_for(lambda: (MARKER, run.encode()) in got)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    for actor in ACTORS:
        raw = {t for t, p in got if p == f"{run}|raw|{actor.username}".encode()}
        assert len(raw) == (actor is not DASH), f"{actor}: the raw control publish did not arrive"
        seen = {t for t, p in got if p == f"{run}|{actor.username}".encode()}
        assert seen == expected[actor.username], f"{actor}: extra {seen - expected[actor.username]}, " \
                                                 f"missing {expected[actor.username] - seen}"


@pytest.mark.parametrize("mtls", LISTENERS)
@pytest.mark.parametrize("actor", ACTORS, ids=lambda i: i.username)
async def test_subscribe_matrix(bus: Bus, actor: Identity, mtls: bool) -> None:
    """Whatever an actor subscribes to (every literal topic, broad wildcards), it receives exactly what it may read."""
    run = tag()
    readable = [t for t in universe() if may_read(actor, t)]
    assert readable
    got: list[tuple[str, bytes]] = []
    async with make_client(bus.address(actor.username, mtls=mtls), identifier=actor.client_id) as c:
        legit = code_filters(actor)
        granted = await c.subscribe([(f, 1) for f in legit])
        assert 128 not in [int(getattr(g, "value", g)) for g in granted], f"{actor}: own filters refused {granted}"
        for f in [*WILDCARDS, *universe()]:
            with contextlib.suppress(aiomqtt.MqttError):  # a refusal may come as SUBACK 0x80
                await c.subscribe(f, qos=1)
        task = asyncio.create_task(collect(c, got))
        async with make_client(bus.root(), identifier="injector") as inj:
            for t in universe():
                await inj.publish(t, run.encode(), qos=1)
            await inj.publish(readable[0], f"{run}|end".encode(), qos=1)
        await wait_for(lambda: (readable[0], f"{run}|end".encode()) in got)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    seen = {t for t, p in got if p == run.encode()}
    assert seen == set(readable), f"{actor}: extra {seen - set(readable)}, missing {set(readable) - seen}"


TAKEOVERS = [(D0A, E0), (D0A, D0B), (D1A, D0A), (E0, CLOUD), (E0, E1), (DASH, E0), (CLOUD, E1), (C0, E0), (E0, C0)]


async def _takeover(bus: Bus, attacker: Identity, victim: Identity, mtls: bool) -> None:
    got: list[tuple[str, bytes]] = []
    run = tag().encode()
    readable = next(t for t in universe() if may_read(victim, t))
    async with make_client(bus.address(victim.username, mtls=mtls), identifier=victim.client_id) as v:
        await v.subscribe(readable, qos=1)
        task = asyncio.create_task(collect(v, got))
        async with make_client(bus.address(attacker.username, mtls=mtls), identifier=victim.client_id) as a:
            for t in [t for t in universe() if may_write(attacker, t)][:1]:
                await a.publish(t, b"x", qos=1)
            async with make_client(bus.root(), identifier="injector") as inj:
                await inj.publish(readable, run, qos=1)
            await wait_for(lambda: (readable, run) in got)
        assert v._client.is_connected(), f"{attacker} knocked {victim} off"
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.parametrize("mtls", LISTENERS)
async def test_no_session_takeover(bus: Bus, mtls: bool) -> None:
    """Connecting with another identity's client id neither kicks it nor lands in its session."""
    for attacker, victim in TAKEOVERS:
        await _takeover(bus, attacker, victim, mtls)
