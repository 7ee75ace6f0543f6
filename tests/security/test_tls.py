"""TLS and credentials end to end: real paho, aiomqtt, DeviceClient and Session; refusals and revocation."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ssl
import threading
from pathlib import Path

import aiomqtt
import paho.mqtt.client as mqtt
import pytest
from typer.testing import CliRunner

from broker import topics
from broker.address import BrokerAddress
from broker.aio import make_client
from broker.runners.secure import SecureMosquitto
from broker.session import Session
from broker.wire.device import ErrorReport
from broker.wire.envelope import Kind, encode_envelope
from device_sdk import CapabilityProfile, DeviceClient, ModalityProfile
from megace.cli import app
from megace.provision.pki import CertificateAuthority, save_pair
from megace.provision.store import Store
from tests.security.bus import D0A, E0, collect, connect_error, wait_for
from tests.security.conftest import Bus

LISTENERS = [pytest.param(True, id="mtls"), pytest.param(False, id="password")]


def _url(bus: Bus, username: str, mtls: bool) -> str:
    """The identity's own snippet URL (from its folder), pointed at this test broker's port."""
    name = "broker.url" if mtls else "broker-password.url"
    text = (bus.broker.store.identity_dir(username) / name).read_text().strip()
    port = bus.broker.mtls_port if mtls else bus.broker.password_port
    return text.replace("@localhost:8883", f"@127.0.0.1:{port}").replace("@localhost:8884", f"@127.0.0.1:{port}")


@pytest.mark.parametrize("mtls", LISTENERS)
async def test_device_sdk_and_edge_session(bus: Bus, mtls: bool, tmp_path: Path) -> None:
    """DeviceClient (paho) and an edge Session (aiomqtt) talk through the secure broker from URL snippets."""
    device_addr = BrokerAddress.from_url(_url(bus, D0A.username, mtls), env={})
    edge_addr = BrokerAddress.from_url(_url(bus, E0.username, mtls), env={})
    assert (device_addr.cert_file is not None) == mtls and (device_addr.password is not None) == (not mtls)
    got: list[tuple[str, bytes]] = []
    downlinks: list[object] = []
    edge_ready = asyncio.Event()

    async def serve(client: aiomqtt.Client, attempt: int) -> None:
        await client.subscribe([(f, 1) for f in topics.subscriptions(topics.site_device_uplinks("site-0"))])
        edge_ready.set()
        task = asyncio.create_task(collect(client, got))
        await wait_for(lambda: any(t.endswith("/up/register") for t, _ in got), 10)
        report = ErrorReport("test", "hello over TLS").to_body()
        await client.publish(topics.device_down("site-0", "d0a", topics.Downlink.ERROR),
                             encode_envelope(Kind.ERROR, E0.username, 1, report), qos=1)
        await wait_for(lambda: downlinks, 10)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    session = Session(edge_addr, serve, identifier=E0.client_id, name="edge e0")
    runner = asyncio.create_task(session.run())
    await asyncio.wait_for(edge_ready.wait(), 10)
    dev = DeviceClient("site-0", "d0a", device_addr, on_downlink=lambda kind, msg: downlinks.append(msg),
                       store_path=tmp_path / "q.sqlite")
    with dev:
        await asyncio.to_thread(dev.register, CapabilityProfile("d0a", {"imu": ModalityProfile((4, 6), "<f4", 50.0)}))
        await asyncio.wait_for(runner, 20)
    assert session.counters["connect_failures"] == 0


def _paho_connect(address: BrokerAddress) -> str:
    """Connect with plain paho; returns the CONNACK reason or the exception text."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="probe", protocol=mqtt.MQTTv311)
    if address.username:
        c.username_pw_set(address.username, address.password)
    c.tls_set_context(address.ssl_context())
    result: list[str] = []
    done = threading.Event()
    c.on_connect = lambda cl, u, f, rc, p=None: (result.append(str(rc)), done.set())
    c.on_disconnect = lambda cl, u, f, rc, p=None: (result.append(f"disconnected: {rc}"), done.set())
    try:
        c.connect(address.host, address.port)
    except (ssl.SSLError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    c.loop_start()
    done.wait(5)
    c.loop_stop()
    c.disconnect()
    return result[0] if result else "no answer"


async def test_refusals_are_clear(bus: Bus, tmp_path: Path) -> None:
    """Wrong CA, unknown certificate, wrong password, no credentials: refused, and the error says why."""
    good = bus.address(D0A.username, mtls=True)
    pw = bus.address(D0A.username, mtls=False)
    evil = CertificateAuthority.create("not the megace CA")
    evil.save(tmp_path)
    save_pair(tmp_path, "client", *evil.issue(D0A.username))
    cases = {
        "wrong CA": (dataclasses.replace(good, ca_file=str(tmp_path / "ca.crt")), "certificate verify failed"),
        "unknown certificate": (dataclasses.replace(good, cert_file=str(tmp_path / "client.crt"),
                                                    key_file=str(tmp_path / "client.key")), "unknown ca"),
        "wrong password": (dataclasses.replace(pw, password="guess"), "Not authorized"),
        "no password": (dataclasses.replace(pw, username=None, password=None), "Not authorized"),
    }
    assert await connect_error(good) == "connected" and await connect_error(pw) == "connected"
    for what, (address, expected) in cases.items():
        aio = await connect_error(address)
        paho = await asyncio.to_thread(_paho_connect, address)
        assert expected.lower() in aio.lower(), f"{what}: aiomqtt said {aio!r}"
        assert expected.lower() in paho.lower() or "refused" in paho.lower(), f"{what}: paho said {paho!r}"


def _cli(*args: str) -> str:
    result = CliRunner().invoke(app, ["provision", *args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("mode", ["static", "dynsec"])
async def test_revoke_one_device_is_one_command(own_store: Store, mode: str) -> None:
    """After `megace provision revoke`, the device is cut off on both listeners; its neighbours are not."""
    with SecureMosquitto(own_store, mode=mode) as broker:  # type: ignore[arg-type]
        victim = broker.address(D0A.username, mtls=False)
        async with make_client(victim, identifier=D0A.client_id) as connected:
            args = ["revoke", str(own_store.root), D0A.username, "--reload-pid", str(broker.pid)]
            if mode == "dynsec":
                args += ["--dynsec-url", f"mqtts://127.0.0.1:{broker.password_port}"]
            await asyncio.to_thread(_cli, *args)
            await asyncio.sleep(0.3)
            with contextlib.suppress(aiomqtt.MqttError):  # static: still connected, but allowed nothing
                await connected.publish(topics.device_up("site-0", "d0a", topics.Uplink.FEATURES), b"x", qos=1)
            if mode == "dynsec":
                assert not connected._client.is_connected(), "dynsec deleteClient should have kicked it"
        assert "certificate revoked" in (await connect_error(broker.address(D0A.username, mtls=True))).lower()
        assert "not authorized" in (await connect_error(victim)).lower()
        assert await connect_error(broker.address("megace-dev-d0b", mtls=True)) == "connected"


async def test_static_revoked_device_is_silenced_while_connected(own_store: Store) -> None:
    """Static files cannot kick, but after SIGHUP the ACL no longer lets a connected revoked device through."""
    with SecureMosquitto(own_store) as broker:
        got: list[tuple[str, bytes]] = []
        async with make_client(broker.address(E0.username), identifier=E0.client_id) as edge, \
                make_client(broker.address(D0A.username), identifier=D0A.client_id) as dev:
            await edge.subscribe("megace/v1/site/site-0/device/+/up/+", qos=1)
            task = asyncio.create_task(collect(edge, got))
            up = topics.device_up("site-0", "d0a", topics.Uplink.FEATURES)
            await dev.publish(up, b"before", qos=1)
            await wait_for(lambda: (up, b"before") in got)
            own_store.revoke(D0A.username)
            broker.reload()
            await asyncio.sleep(0.3)
            with contextlib.suppress(aiomqtt.MqttError):
                await dev.publish(up, b"after", qos=1)
            other = topics.device_up("site-0", "d0b", topics.Uplink.FEATURES)
            async with make_client(broker.address("megace-dev-d0b"), identifier="megace-dev-d0b") as d0b:
                await d0b.publish(other, b"control", qos=1)
            await wait_for(lambda: (other, b"control") in got)
            task.cancel()
        assert (up, b"after") not in got


async def test_live_dynsec_add_and_rotate(own_store: Store) -> None:
    """A device added to a running broker through the plugin works at once; rotating it retires the old password."""
    with SecureMosquitto(own_store, mode="dynsec") as broker:
        url = f"mqtts://127.0.0.1:{broker.password_port}"
        await asyncio.to_thread(_cli, "device", str(own_store.root), "site-0", "d9", "--dynsec-url", url)
        new = broker.address("megace-dev-d9", mtls=False)
        assert await connect_error(new) == "connected"
        await asyncio.to_thread(_cli, "device", str(own_store.root), "site-0", "d9", "--dynsec-url", url,
                                "--reload-pid", str(broker.pid))
        assert "not authorized" in (await connect_error(new)).lower()
        assert await connect_error(broker.address("megace-dev-d9", mtls=False)) == "connected"
