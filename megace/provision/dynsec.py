"""The dynamic-security set-up: Mosquitto's ``mosquitto_dynamic_security.so`` holds clients and roles.

Two ways in, same content: :func:`initial_config` writes the plugin's JSON file before the broker
first starts (no broker needed to provision a site), and :class:`DynsecAdmin` changes a running
broker through the plugin's control topic ``$CONTROL/dynamic-security/v1`` -- the API
``mosquitto_ctrl dynsec`` speaks, batched into one request per change. Deleting a client also
disconnects it, so revocation takes effect at once.

Each identity gets its own role (``role-<username>``) holding exactly its rules; the default
access denies everything, including delivery (``publishClientReceive``), which the plugin's own
default allows.
"""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

import paho.mqtt.client as mqtt

from broker.address import BrokerAddress
from megace.provision.identity import Access, Identity, Role

CONTROL = "$CONTROL/dynamic-security/v1"
RESPONSE = f"{CONTROL}/response"
ADMIN_ROLE = "megace-admin"
DEFAULT_ACCESS = {"publishClientSend": False, "publishClientReceive": False, "subscribe": False,
                  "unsubscribe": True}


class DynsecError(RuntimeError):
    """The plugin refused a command (the message carries its error text) or did not answer."""


def role_name(ident: Identity) -> str:
    return f"role-{ident.username}"


def role_acls(ident: Identity) -> list[dict[str, Any]]:
    """The plugin's ACL entries for an identity's rules."""
    if ident.role is Role.ADMIN:
        return [{"acltype": t, "topic": f"{CONTROL}/#", "priority": 0, "allow": True}
                for t in ("publishClientSend", "publishClientReceive", "subscribePattern")]
    acls: list[dict[str, Any]] = []
    for rule in ident.rules():
        if rule.access is Access.WRITE:
            acls.append({"acltype": "publishClientSend", "topic": rule.topic, "priority": 0, "allow": True})
            continue
        acls.append({"acltype": "publishClientReceive", "topic": rule.topic, "priority": 0, "allow": True})
        acls.append({"acltype": "subscribePattern", "topic": rule.topic, "priority": 0, "allow": True})
        acls.extend({"acltype": "subscribeLiteral", "topic": f, "priority": 0, "allow": True}
                    for f in rule.subscribe if f != rule.topic)
    return acls


def _bind_clientid(ident: Identity) -> bool:
    """Services and devices always send their username as client id; dashboards may not (the broker's
    ``use_username_as_clientid`` still binds them)."""
    return ident.role in (Role.DEVICE, Role.EDGE, Role.CONTROL, Role.INFER, Role.CLOUD)


def _file_client(ident: Identity, hashed: str) -> dict[str, Any]:
    """A client entry of the plugin's file from a ``$7$`` hash (the same PBKDF2-SHA512 the plugin uses)."""
    try:
        _, kind, iterations, salt, digest = hashed.split("$")
    except ValueError:
        raise ValueError(f"not a $7$ password hash for {ident.username}") from None
    if kind != "7":
        raise ValueError(f"not a $7$ password hash for {ident.username}")
    entry: dict[str, Any] = {
        "username": ident.username, "textName": str(ident), "password": digest, "salt": salt,
        "iterations": int(iterations),
        "roles": [{"rolename": ADMIN_ROLE if ident.role is Role.ADMIN else role_name(ident)}],
    }
    if _bind_clientid(ident):
        entry["clientid"] = ident.client_id
    return entry


def initial_config(admin: Identity, admin_hash: str, members: dict[Identity, str]) -> str:
    """The plugin's JSON file (``plugin_opt_config_file``): the admin and ``members`` (identity -> ``$7$`` hash).

    The broker owns the file once started (it rewrites it on every change): install it only
    before the first start, then change a running broker with :class:`DynsecAdmin`.
    """
    clients = [_file_client(admin, admin_hash)]
    roles: list[dict[str, Any]] = [{"rolename": ADMIN_ROLE, "acls": role_acls(admin)}]
    for ident, hashed in sorted(members.items(), key=lambda kv: kv[0].username):
        clients.append(_file_client(ident, hashed))
        roles.append({"rolename": role_name(ident), "textName": str(ident), "acls": role_acls(ident)})
    doc = {"clients": clients, "groups": [], "roles": roles, "defaultACLAccess": DEFAULT_ACCESS}
    return json.dumps(doc, indent=1) + "\n"


def create_commands(ident: Identity, password: str) -> list[dict[str, Any]]:
    """Commands adding one identity to a running broker (its role first, then the client holding it)."""
    client: dict[str, Any] = {"command": "createClient", "username": ident.username, "password": password,
                              "textname": str(ident), "roles": [{"rolename": role_name(ident), "priority": 0}]}
    if _bind_clientid(ident):
        client["clientid"] = ident.client_id
    return [{"command": "createRole", "rolename": role_name(ident), "textname": str(ident), "acls": role_acls(ident)},
            client]


def delete_commands(username: str) -> list[dict[str, Any]]:
    """Commands removing one identity; ``deleteClient`` also disconnects it."""
    return [{"command": "deleteClient", "username": username},
            {"command": "deleteRole", "rolename": f"role-{username}"}]


class DynsecAdmin:
    """A short-lived admin connection to a broker's dynamic-security plugin."""

    def __init__(self, address: BrokerAddress, timeout_s: float = 10.0) -> None:
        self.address = address
        self.timeout_s = timeout_s

    def send(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Run ``commands`` in one request; raise :class:`DynsecError` naming every failed command."""
        done = threading.Event()
        answer: list[dict[str, Any]] = []
        ready = threading.Event()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{self.address.username or 'admin'}",
                        protocol=mqtt.MQTTv311, clean_session=True)
        if self.address.username:
            c.username_pw_set(self.address.username, self.address.password)
        if self.address.tls:
            c.tls_set_context(self.address.ssl_context())

        def on_message(client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
            answer.extend(json.loads(msg.payload).get("responses", []))
            done.set()

        def on_connect(client: mqtt.Client, userdata: object, flags: object, rc: Any, props: object = None) -> None:
            if rc == 0:
                client.subscribe(RESPONSE, qos=1)

        c.on_message = on_message
        c.on_connect = on_connect
        c.on_subscribe = lambda *a: ready.set()
        c.connect(self.address.host, self.address.port, keepalive=self.address.keepalive)
        c.loop_start()
        try:
            if not ready.wait(self.timeout_s):
                raise DynsecError(f"could not subscribe to {RESPONSE} on {self.address} as {self.address.username}")
            tagged = [{**cmd, "correlationData": uuid.uuid4().hex} for cmd in commands]
            c.publish(CONTROL, json.dumps({"commands": tagged}), qos=1)
            if not done.wait(self.timeout_s):
                raise DynsecError(f"no answer from the dynamic-security plugin on {self.address}")
        finally:
            c.disconnect()
            c.loop_stop()
        errors = [f"{r.get('command')}: {r['error']}" for r in answer if r.get("error")]
        if errors:
            raise DynsecError("; ".join(errors))
        return answer

    def add(self, ident: Identity, password: str) -> None:
        self.send(create_commands(ident, password))

    def revoke(self, username: str) -> None:
        self.send(delete_commands(username))
