"""``megace run`` (the real command, a one-round loop on its embedded broker) prints the dashboard's URL; the
page it names is served, and its WebSockets listener is the embedded broker's, on loopback only, carrying the
run's status topics to an MQTT-over-WebSockets client. ``megace run --secure`` prints a wss:// URL for the
read-only dashboard identity and where its password is (tests/dashboard/test_secure_dashboard.py: the page)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import paho.mqtt.client as mqtt
import psutil

from broker import topics

REPO = Path(__file__).resolve().parents[2]
URL = re.compile(r"dashboard: (http://127\.0\.0\.1:\d+/index\.html\?ws=\S+)")


def _ws_statuses(host: str, port: int, seen: dict[str, dict], *, user: str | None = None, password: str | None = None,
                 ca: str | None = None) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, transport="websockets", protocol=mqtt.MQTTv311)
    if ca:
        c.tls_set(ca_certs=ca)
    if user:
        c.username_pw_set(user, password)
    c.on_connect = lambda cl, *_: cl.subscribe(topics.all_status(), 0)
    c.on_message = lambda _c, _u, m: seen.__setitem__(m.topic, json.loads(m.payload)) if m.payload else None
    c.connect(host, port)
    c.loop_start()
    return c


def test_megace_run_prints_a_dashboard_url_served_over_its_loopback_websockets_listener(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "megace", "run", "--edges", "1", "--devices-per-edge", "1", "--rounds", "1",
         "--steps", "2", "--time-limit", "150", "--out", str(tmp_path / "run")],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    client = None
    try:
        assert proc.stdout is not None
        url, lines = None, []
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = URL.search(line)
            url = m.group(1) if m else None
        assert url, "".join(lines)
        ws = urlparse(parse_qs(urlparse(url).query)["ws"][0])
        assert (ws.scheme, ws.hostname) == ("ws", "127.0.0.1")
        with urllib.request.urlopen(url, timeout=10) as page:
            assert b"megace fleet" in page.read()
        base = url.split("index.html")[0]
        for asset in ("fleet.js", "app.js", "vendor/mqtt.min.js", "vendor/uPlot.iife.min.js"):
            with urllib.request.urlopen(base + asset, timeout=10) as r:
                assert r.status == 200 and len(r.read()) > 1000, asset
        # the embedded broker (started after the URL is printed: the page retries) listens for WebSockets on
        # loopback only, unlike Mosquitto 2.0.11
        deadline = time.monotonic() + 60
        while True:
            listening = [c.laddr for c in psutil.Process(proc.pid).net_connections("tcp") if c.status == "LISTEN"]
            ws_listeners = [a.ip for a in listening if a.port == ws.port]
            if ws_listeners or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert ws_listeners == ["127.0.0.1"], listening
        seen: dict[str, dict] = {}
        client = _ws_statuses(ws.hostname, ws.port or 0, seen)
        edge = topics.status(topics.Role.EDGE, "edge-0", "site-0")
        deadline = time.monotonic() + 90
        while seen.get(edge, {}).get("state") != "online" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert seen.get(edge, {}).get("state") == "online", seen
        assert seen[edge]["detail"]["site"] == "site-0"
    finally:
        if client is not None:
            client.disconnect()
            client.loop_stop()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # the loop's own clean-up stops its services
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


SECURE_URL = re.compile(r"dashboard: (http://127\.0\.0\.1:\d+/index\.html\?ws=wss\S+)")
PASSWORD_FILE = re.compile(r"the password, which is in (\S+/password)")


def test_megace_run_secure_prints_a_wss_url_and_where_the_read_only_password_is(tmp_path: Path) -> None:
    """``--secure``: the URL names the broker's wss:// listener and the dashboard identity, the output names the
    password file but never the password, and that login reads the run's status over TLS and cannot write."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    state = tmp_path / "pki"
    proc = subprocess.Popen(
        [sys.executable, "-m", "megace", "run", "--secure", "--state-dir", str(state), "--edges", "1",
         "--devices-per-edge", "1", "--rounds", "1", "--steps", "2", "--time-limit", "150", "--out",
         str(tmp_path / "run")],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    client = None
    try:
        assert proc.stdout is not None
        url, secret, lines = None, None, []
        deadline = time.monotonic() + 120
        while secret is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            url = url or (m.group(1) if (m := SECURE_URL.search(line)) else None)
            secret = m.group(1) if (m := PASSWORD_FILE.search(line)) else None
        assert url and secret, "".join(lines)
        query = parse_qs(urlparse(url).query)
        ws = urlparse(query["ws"][0])
        assert (ws.scheme, ws.hostname, query["user"]) == ("wss", "127.0.0.1", ["megace-dash-loop"])
        assert Path(secret) == (state / "identities" / "megace-dash-loop" / "password").resolve()
        password = Path(secret).read_text().strip()
        assert len(password) >= 32 and password not in "".join(lines)
        seen: dict[str, dict] = {}
        client = _ws_statuses(ws.hostname or "", ws.port or 0, seen, user="megace-dash-loop", password=password,
                              ca=str(state / "broker" / "ca.crt"))
        edge = topics.status(topics.Role.EDGE, "edge-0", "site-0")
        deadline = time.monotonic() + 120
        while seen.get(edge, {}).get("state") != "online" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert seen.get(edge, {}).get("state") == "online", (seen, "".join(lines))
        acl = (state / "broker" / "megace.acl").read_text().split("user megace-dash-loop\n", 1)[1].split("\n\n")[0]
        assert acl.splitlines() == [f"topic read {f}" for f in (topics.all_status(), topics.all_metrics(),
                                                                 topics.all_events())]
    finally:
        if client is not None:
            client.disconnect()
            client.loop_stop()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def test_megace_dashboard_serves_the_page_pointed_at_the_given_broker() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "megace", "dashboard", "--port", "0", "--ws",
                             "wss://broker.example:9443/", "--user", "ops"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        m = re.search(r"dashboard: (http://127\.0\.0\.1:\d+/index\.html\?\S+)", line)
        assert m, line
        query = parse_qs(urlparse(m.group(1)).query)
        assert query == {"ws": ["wss://broker.example:9443/"], "user": ["ops"]}
        with urllib.request.urlopen(m.group(1), timeout=10) as page:
            html = page.read().decode()
        assert 'src="vendor/mqtt.min.js"' in html and "https://" not in html  # no CDN
        with urllib.request.urlopen(m.group(1).split("index.html")[0] + "vendor/VERSIONS.txt", timeout=10) as r:
            assert "mqtt@" in r.read().decode()
    finally:
        proc.terminate()
        proc.wait(10)
