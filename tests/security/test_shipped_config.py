"""deploy/mosquitto/megace.conf itself, with provisioned files: it starts, refuses anonymous clients
on every listener, and each listener admits the identity it is meant for."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.address import BrokerAddress
from broker.runners import find_mosquitto
from broker.runners.ports import free_port, wait_for_port
from megace.provision.store import Store
from tests.security.bus import D0A, E0, connect_error

CONF = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto" / "megace.conf"


@pytest.fixture
def shipped(own_store: Store, tmp_path: Path) -> Iterator[dict[str, int]]:
    ports = {"loopback": free_port(), "mtls": free_port(), "password": free_port()}
    text = CONF.read_text().replace("/etc/mosquitto/megace/", f"{own_store.broker_dir.resolve()}/")
    text = text.replace("/var/lib/mosquitto/", f"{tmp_path}/").replace("log_dest syslog", "log_dest stderr")
    text = re.sub(r"^listener 1883 127\.0\.0\.1$", f"listener {ports['loopback']} 127.0.0.1", text, flags=re.M)
    text = re.sub(r"^listener 8883$", f"listener {ports['mtls']} 127.0.0.1", text, flags=re.M)
    text = re.sub(r"^listener 8884$", f"listener {ports['password']} 127.0.0.1", text, flags=re.M)
    if os.geteuid() == 0:
        text += "user root\n"  # else Mosquitto drops to `mosquitto`, which cannot read the test's 0600 files
    conf = tmp_path / "megace.conf"
    conf.write_text(text)
    proc = subprocess.Popen([find_mosquitto(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for port in ports.values():
            wait_for_port("127.0.0.1", port)
        yield ports
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stderr:
            proc.stderr.close()


async def test_shipped_config_is_secure_by_default(own_store: Store, shipped: dict[str, int]) -> None:
    cert = own_store.address(D0A.username)
    pw = own_store.address(E0.username, mtls=False)
    loopback = BrokerAddress("127.0.0.1", shipped["loopback"], False, None, pw.username, pw.password)
    assert await connect_error(dataclasses.replace(cert, host="127.0.0.1", port=shipped["mtls"])) == "connected"
    assert await connect_error(dataclasses.replace(pw, host="127.0.0.1", port=shipped["password"])) == "connected"
    assert await connect_error(loopback) == "connected"
    anonymous = [dataclasses.replace(loopback, username=None, password=None),
                 dataclasses.replace(pw, host="127.0.0.1", port=shipped["password"], username=None, password=None)]
    for address in anonymous:
        assert "not authorized" in (await connect_error(address)).lower()
