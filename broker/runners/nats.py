"""Run Debian's ``nats-server`` (MQTT listener on JetStream) as child processes: one node or a cluster.

NATS 2.9 serves MQTT 3.1.1 only with a ``server_name``, JetStream (it keeps MQTT sessions, retained
messages and QoS 1 deliveries in streams) and an ``mqtt {}`` block. A node whose MQTT port already
accepts TCP can still refuse CONNECT while JetStream (in a cluster: its meta leader) is not ready,
so a node counts as started only once an MQTT CONNECT on it gets CONNACK 0.

:class:`NatsCluster` starts every node from one config (by default the generated one below; the
tests pass ``deploy/nats/cluster-node.conf``) whose per-node values come from ``NATS_*`` environment
variables: nats-server resolves a ``$NAME`` it does not define from the environment, arrays included.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from types import TracebackType
from typing import Self

from broker.address import BrokerAddress
from broker.capabilities import StartedBroker, started_address
from broker.runners.child import ChildProcessRunner
from broker.runners.ports import free_port, wait_for_port, wait_mqtt_ready

# One template for a single node and for cluster nodes; ``$NATS_*`` come from the environment.
CONFIG_TEMPLATE = """\
server_name: $NATS_SERVER_NAME
listen: $NATS_LISTEN
http: $NATS_HTTP_LISTEN
jetstream {{ store_dir: $NATS_STORE_DIR }}
mqtt {{ listen: $NATS_MQTT_LISTEN }}
{websocket}{cluster}"""
WEBSOCKET_BLOCK = "websocket { listen: $NATS_WS_LISTEN, no_tls: true }\n"
CLUSTER_BLOCK = "cluster { name: $NATS_CLUSTER_NAME, listen: $NATS_CLUSTER_LISTEN, routes: $NATS_ROUTES }\n"


def find_nats_server() -> str:
    """Path of the nats-server binary, or a clear error telling how to install it."""
    for candidate in (shutil.which("nats-server"), "/usr/sbin/nats-server", "/usr/bin/nats-server"):
        if candidate and Path(candidate).exists():
            return candidate
    raise FileNotFoundError("nats-server not found; install it with `apt-get install -y nats-server` (Debian/Ubuntu)")


class NatsBroker(StartedBroker, ChildProcessRunner):
    """One nats-server with an MQTT listener; same interface as :class:`~broker.runners.MosquittoBroker`.

    ``port`` is the MQTT port (what megace connects to); ``client_port`` is the NATS protocol port.
    :meth:`stop` + :meth:`start` keep the JetStream store (sessions, retained messages).
    """

    KIND = "nats"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, server_name: str | None = None,
                 client_port: int = 0, websocket_port: int | None = None, state_dir: Path | None = None,
                 config_file: Path | None = None, cluster_name: str | None = None, cluster_port: int = 0,
                 routes: list[str] | None = None, ready_timeout_s: float = 30.0) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.client_port = client_port or free_port(host)
        self.monitor_port = free_port(host)  # HTTP monitoring: /healthz, /connz (who is connected where)
        self.websocket_port = (websocket_port or free_port(host)) if websocket_port is not None else None
        self.server_name = server_name or f"megace-{uuid.uuid4().hex[:8]}"
        self.cluster_name = cluster_name
        self.cluster_port = (cluster_port or free_port(host)) if cluster_name else None
        self.routes = list(routes or [])
        self.ready_timeout_s = ready_timeout_s
        super().__init__(state_dir, prefix="megace-nats-")
        self.store_dir = self.state_dir / "jetstream"
        self.log_path = self.state_dir / "nats.log"
        self.config_path = Path(config_file) if config_file else self.state_dir / "nats.conf"
        self._generated = config_file is None
        self._log: object | None = None

    def environment(self) -> dict[str, str]:
        """The ``NATS_*`` values the config reads (also what a deployment puts in its environment)."""
        env = {
            "NATS_SERVER_NAME": self.server_name,
            "NATS_LISTEN": f"{self.host}:{self.client_port}",
            "NATS_HTTP_LISTEN": f"{self.host}:{self.monitor_port}",
            "NATS_STORE_DIR": f'"{self.store_dir}"',
            "NATS_MQTT_LISTEN": f"{self.host}:{self.port}",
        }
        if self.websocket_port is not None:
            env["NATS_WS_LISTEN"] = f"{self.host}:{self.websocket_port}"
        if self.cluster_name:
            env["NATS_CLUSTER_NAME"] = self.cluster_name
            env["NATS_CLUSTER_LISTEN"] = f"{self.host}:{self.cluster_port}"
            env["NATS_ROUTES"] = "[" + ", ".join(self.routes) + "]"
        return env

    def start(self, *, wait_ready: bool = True) -> Self:
        """Start the node; with ``wait_ready`` return only once MQTT CONNECT is accepted."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self._generated:
            self.config_path.write_text(CONFIG_TEMPLATE.format(
                websocket=WEBSOCKET_BLOCK if self.websocket_port is not None else "",
                cluster=CLUSTER_BLOCK if self.cluster_name else ""))
        log = open(self.log_path, "ab")  # noqa: SIM115 - a file the child writes to for its whole life
        self._log = log
        self._proc = subprocess.Popen([find_nats_server(), "-c", str(self.config_path)],
                                      env={**os.environ, **self.environment()}, stdout=log, stderr=log,
                                      start_new_session=True)
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        """Wait until the MQTT port listens and accepts a CONNECT; on failure stop and say why."""
        try:
            wait_for_port(self.host, self.port, timeout_s=self.ready_timeout_s)
            wait_mqtt_ready(self.host, self.port, timeout_s=self.ready_timeout_s)
        except TimeoutError as exc:
            tail = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
            self.stop(kill=True)
            raise RuntimeError(f"nats-server {self.server_name} not ready: {exc}\n{tail}") from None

    def mqtt_clients(self) -> list[str]:
        """MQTT client ids connected to this node now (from its monitoring port's ``/connz``)."""
        url = f"http://{self.host}:{self.monitor_port}/connz?limit=100000"
        with urllib.request.urlopen(url, timeout=5) as resp:
            doc = json.load(resp)
        return [c["mqtt_client"] for c in doc.get("connections", []) if c.get("mqtt_client")]

    def healthy(self) -> bool:
        """``/healthz``: in a cluster, OK only once this node's JetStream streams and consumers are current."""
        url = f"http://{self.host}:{self.monitor_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return json.load(resp).get("status") == "ok"
        except (OSError, ValueError):  # down, restarting, or a 503 with an error document
            return False

    def stop(self, *, kill: bool = False) -> None:
        """Stop the node (SIGTERM: clean shutdown; ``kill=True``: SIGKILL, a crash)."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
                try:
                    self._proc.wait(15)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            self._proc = None
        if self._log is not None:
            self._log.close()  # type: ignore[attr-defined]
            self._log = None



class NatsCluster:
    """``n`` nats-server nodes routed to each other on loopback; :meth:`kill` / :meth:`restart` one node.

    Every node lists all nodes' route URLs (its own included, which NATS ignores), as a deployment would.
    """

    def __init__(self, n: int = 3, host: str = "127.0.0.1", *, name: str | None = None,
                 config_file: Path | None = None, ready_timeout_s: float = 60.0,
                 state_dir: Path | None = None) -> None:
        if n < 1:
            raise ValueError(f"a cluster needs at least one node, got {n}")
        self.host = host
        self.name = name or f"megace-{uuid.uuid4().hex[:6]}"
        # ``state_dir`` given: the nodes' stores and logs stay there (a failed test keeps them to read)
        self._tmp = tempfile.TemporaryDirectory(prefix="megace-nats-cluster-") if state_dir is None else None
        self.state_dir = Path(self._tmp.name) if self._tmp else Path(state_dir)  # type: ignore[arg-type]
        cluster_ports = [free_port(host) for _ in range(n)]
        routes = [f"nats-route://{host}:{p}" for p in cluster_ports]
        self.nodes = [
            NatsBroker(host, server_name=f"{self.name}-n{i + 1}", state_dir=self.state_dir / f"n{i + 1}",
                       config_file=config_file, cluster_name=self.name, cluster_port=cluster_ports[i],
                       routes=routes, ready_timeout_s=ready_timeout_s)
            for i in range(n)
        ]

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Each node's MQTT ``(host, port)``, in node order."""
        return [(node.host, node.port) for node in self.nodes]

    @property
    def address(self) -> BrokerAddress:
        """Every node, the first one first (clients move on when one fails), MQTT 3.1.1 as for one node."""
        return started_address("nats", self.host, self.nodes[0].port, alternates=tuple(self.addresses[1:]))

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def start(self) -> Self:
        """Start all nodes, then wait for each: JetStream needs a quorum before any MQTT CONNECT works."""
        for node in self.nodes:
            node.start(wait_ready=False)
        for node in self.nodes:
            node.wait_ready()
        return self

    def wait_healthy(self, timeout_s: float = 120.0) -> float:
        """Seconds until every running node reports healthy (a restarted one caught up); TimeoutError if never.

        Kill a second node before the first one caught up and the streams whose replicas were on both lose
        their quorum: MQTT on the survivors stalls until one of them is back."""
        t0 = time.monotonic()
        while not all(node.healthy() for node in self.nodes if node.running):
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"cluster {self.name} not healthy after {timeout_s} s")
            time.sleep(0.1)
        return time.monotonic() - t0

    def kill(self, i: int) -> None:
        """SIGKILL node ``i`` (a crash: no lame-duck, no flush)."""
        self.nodes[i].stop(kill=True)

    def restart(self, i: int) -> None:
        """Start node ``i`` again on the same ports and store (after :meth:`kill` or a stop)."""
        self.nodes[i].stop()
        self.nodes[i].start()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def close(self) -> None:
        for node in self.nodes:
            node.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
