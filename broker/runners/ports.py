"""Free loopback ports for brokers started by tests and by ``megace run``, and knowing when one is ready."""

from __future__ import annotations

import contextlib
import socket
import time
import uuid


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout_s: float = 10.0) -> None:
    """Block until something accepts TCP connections on ``host:port``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s} s") from None
            time.sleep(0.02)


def mqtt_connack(host: str, port: int, timeout_s: float = 2.0) -> int:
    """Return code of a bare MQTT 3.1.1 CONNECT (clean session) on ``host:port``; raises OSError if none.

    Written by hand so that readiness does not depend on the client library under test."""
    cid = f"megace-probe-{uuid.uuid4().hex[:12]}".encode()
    variable = b"\x00\x04MQTT\x04\x02\x00\x0a"  # protocol name, level 4, clean session, keepalive 10 s
    payload = len(cid).to_bytes(2, "big") + cid
    body = variable + payload
    with socket.create_connection((host, port), timeout=timeout_s) as s:
        s.settimeout(timeout_s)
        s.sendall(bytes([0x10, len(body)]) + body)
        got = b""
        while len(got) < 4:
            chunk = s.recv(4 - len(got))
            if not chunk:
                raise ConnectionError(f"{host}:{port} closed the connection before CONNACK")
            got += chunk
        if got[0] != 0x20:
            raise ConnectionError(f"{host}:{port} answered CONNECT with packet type {got[0]:#x}")
        with contextlib.suppress(OSError):
            s.sendall(b"\xe0\x00")  # DISCONNECT
        return got[3]


def wait_mqtt_ready(host: str, port: int, timeout_s: float = 30.0) -> None:
    """Block until an MQTT CONNECT on ``host:port`` is accepted (CONNACK 0)."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            code = mqtt_connack(host, port)
            if code == 0:
                return
            last = f"CONNACK {code}"
        except OSError as exc:
            last = repr(exc)
        time.sleep(0.1)
    raise TimeoutError(f"MQTT on {host}:{port} not ready after {timeout_s} s: {last}")
