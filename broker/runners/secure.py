"""A private Mosquitto with the production security model, on free loopback ports (tests, ``megace run --secure``).

Two TLS listeners and nothing else: one requires a client certificate whose CN becomes the
username (``use_identity_as_username``), one takes username + password; both replace the client
id with the username (``use_username_as_clientid``), so no identity can take over another's
session. Optionally (``ws_port``) a third: MQTT over WebSockets with TLS (``wss://``) and passwords, for
the browser dashboard's read-only identity; Mosquitto 2.0.11 binds it on *every* interface whatever
address it is given (deploy/dashboard/README.md), so it is never opened without TLS and passwords.
No anonymous access; authorization comes from a provisioning folder
(:class:`megace.provision.store.Store`): its password and ACL files (``mode="static"``) or its
dynamic-security file (``mode="dynsec"``).
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import Literal, Protocol

from broker.address import BrokerAddress
from broker.capabilities import started_protocol
from broker.runners.ports import free_port
from broker.runners.process import MosquittoProcess


class Store(Protocol):
    """What the broker needs from a provisioning folder (:class:`megace.provision.store.Store`; the bus
    layer does not import the layer above it)."""

    @property
    def broker_dir(self) -> Path: ...

    @property
    def admin_username(self) -> str: ...

    def address(self, username: str, *, mtls: bool = True, host: str | None = None) -> BrokerAddress: ...

DYNSEC_PLUGIN_PATHS = ("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
                       "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
                       "/usr/lib/mosquitto_dynamic_security.so", "/usr/local/lib/mosquitto_dynamic_security.so")

TLS_LISTENER = """\
listener {port} {host}
cafile {broker}/ca.crt
certfile {broker}/server.crt
keyfile {broker}/server.key
tls_version tlsv1.2
use_username_as_clientid true
"""

# Mosquitto 2.0.11 binds a `protocol websockets` listener on ALL interfaces, whatever the address on the
# `listener` line (or `bind_interface lo`): hence TLS + password + the same ACL as the other listeners, always.
WSS_LISTENER = """\
listener {port} {host}
protocol websockets
certfile {broker}/server.crt
keyfile {broker}/server.key
tls_version tlsv1.2
use_username_as_clientid true
require_certificate false
"""


def find_dynsec_plugin() -> str:
    """Path of Mosquitto's dynamic-security plugin (Debian's ``mosquitto`` package ships it)."""
    for candidate in DYNSEC_PLUGIN_PATHS:
        if Path(candidate).exists():
            return candidate
    raise FileNotFoundError("mosquitto_dynamic_security.so not found; install Debian's mosquitto 2.0+")


def secure_config(broker_dir: Path, state_dir: Path, host: str, mtls_port: int, password_port: int,
                  mode: Literal["static", "dynsec"], ws_port: int | None = None) -> str:
    """The whole configuration text: shared settings, the listeners (``wss`` on ``ws_port`` when given), then
    the auth back end (``per_listener_settings false``: one password/ACL set for every listener)."""
    b = broker_dir.resolve()
    lines = [
        "per_listener_settings false",
        "allow_anonymous false",
        "max_queued_messages 0",
        "max_inflight_messages 20",
        "set_tcp_nodelay true",
        "persistence false",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
    ]
    if os.geteuid() == 0:
        lines.append("user root")  # else Mosquitto drops to `mosquitto`, which cannot read our 0600 keys
    lines.append(TLS_LISTENER.format(port=mtls_port, host=host, broker=b)
                 + f"require_certificate true\nuse_identity_as_username true\ncrlfile {b}/crl.pem\n")
    lines.append(TLS_LISTENER.format(port=password_port, host=host, broker=b) + "require_certificate false\n")
    if ws_port:
        lines.append(WSS_LISTENER.format(port=ws_port, host=host, broker=b))
    if mode == "static":
        lines += [f"password_file {b}/megace.passwd", f"acl_file {b}/megace.acl"]
    else:
        lines += [f"plugin {find_dynsec_plugin()}", f"plugin_opt_config_file {state_dir}/dynamic-security.json"]
    return "\n".join(lines) + "\n"


class SecureMosquitto(MosquittoProcess):
    """Mosquitto configured from ``store``; ``address(username)`` says how each identity connects to it."""

    def __init__(self, store: Store, *, mode: Literal["static", "dynsec"] = "static", host: str = "127.0.0.1",
                 state_dir: Path | None = None, ws_port: int | None = None) -> None:
        self.store = store
        self.mode = mode
        self.host = host
        self.mtls_port = free_port(host)
        self.password_port = free_port(host)
        self.ws_port = (ws_port or free_port(host)) if ws_port is not None else None
        """The ``wss://`` listener's port (``ws_port=0``: a free one; None: no WebSockets listener)."""
        super().__init__(state_dir, prefix="megace-secure-")

    def start(self) -> SecureMosquitto:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self.mode == "dynsec" and not (self.state_dir / "dynamic-security.json").exists():
            shutil.copyfile(self.store.broker_dir / "dynamic-security.json", self.state_dir / "dynamic-security.json")
        self.config_path.write_text(secure_config(self.store.broker_dir, self.state_dir, self.host, self.mtls_port,
                                                  self.password_port, self.mode, self.ws_port))
        ports = [self.mtls_port, self.password_port] + ([self.ws_port] if self.ws_port else [])
        self._launch(self.host, ports, "secure mosquitto")
        return self

    def reload(self) -> None:
        """SIGHUP: re-read the password, ACL (and CRL) files after ``store.add`` / ``store.revoke``."""
        if self.pid is None:
            raise RuntimeError("broker not running")
        os.kill(self.pid, signal.SIGHUP)

    def address(self, username: str, *, mtls: bool = True) -> BrokerAddress:
        """``username``'s address on this broker: its certificate (``mtls``) or its password, over TLS."""
        a = self.store.address(username, mtls=mtls, host=self.host)
        return BrokerAddress(a.host, self.mtls_port if mtls else self.password_port, True, a.ca_file, a.username,
                             a.password, a.keepalive, a.cert_file, a.key_file, a.password_file,
                             protocol=started_protocol("mosquitto"))

    @property
    def ws_url(self) -> str | None:
        """The dashboard's ``wss://`` URL (password login, the store's CA), or None without the listener."""
        return f"wss://{self.host}:{self.ws_port}/" if self.ws_port else None

    def admin_address(self) -> BrokerAddress:
        """The dynamic-security admin's address (password listener)."""
        return self.address(self.store.admin_username, mtls=False)
