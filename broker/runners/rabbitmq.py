"""Run Debian's ``rabbitmq-server`` with its MQTT plugin as a private child process on loopback.

Nothing on the machine's own RabbitMQ is touched: the node gets its own name, Erlang cookie, config,
data and log dirs (all in a temporary ``state_dir``), its own ``epmd`` on a free port (``ERL_EPMD_PORT``;
the default 4369 belongs to the system's node) and free loopback ports for AMQP, MQTT and Erlang
distribution. The MQTT plugin is enabled offline, by writing the enabled-plugins file the server reads
(``RABBITMQ_ENABLED_PLUGINS_FILE``), and takes anonymous logins (the built-in ``guest``, which RabbitMQ
only admits over loopback).

Root: Debian's ``/usr/sbin/rabbitmq-server`` wrapper switches to user ``rabbitmq`` when started as root,
and that user could not write our temp dir; the runner calls the real script under ``/usr/lib/rabbitmq``,
which runs the Erlang VM as whoever started it (root in CI).

Start-up takes seconds (about 10 s on a loaded 2-core box): tests start one per session. What this
broker lacks compared with Mosquitto is in :mod:`broker.capabilities` (retained messages only reach
exact-topic subscriptions; no ``$share``; MQTT 3.1.1 only).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import uuid
from pathlib import Path
from typing import Self

from broker.capabilities import StartedBroker
from broker.runners.child import ChildProcessRunner
from broker.runners.ports import free_port, wait_for_port, wait_mqtt_ready

SCRIPT_CANDIDATES = ("/usr/lib/rabbitmq/bin/rabbitmq-server",)
CONFIG_TEMPLATE = """\
listeners.tcp.default = {host}:{amqp_port}
mqtt.listeners.tcp.default = {host}:{port}
mqtt.allow_anonymous = true
mqtt.default_user = guest
mqtt.default_pass = guest
mqtt.vhost = /
mqtt.exchange = amq.topic
loopback_users.guest = true
log.console = false
log.file.level = warning
"""


def find_rabbitmq_server() -> str:
    """Path of the unwrapped rabbitmq-server script, or a clear error telling how to install it."""
    for candidate in SCRIPT_CANDIDATES:
        if Path(candidate).exists():
            return candidate
    raise FileNotFoundError("rabbitmq-server not found; install it with `apt-get install -y rabbitmq-server` "
                            "(Debian/Ubuntu)")


def _erlang_ip(host: str) -> str:
    """``127.0.0.1`` as the Erlang tuple ``{127,0,0,1}`` (distribution binds only there)."""
    return "{" + ",".join(host.split(".")) + "}"


def _children(pid: int) -> list[int]:
    """Pids of ``pid``'s children (Linux ``/proc``; elsewhere none, and the caller kills ``pid`` itself)."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


class RabbitMQBroker(StartedBroker, ChildProcessRunner):
    """A private RabbitMQ with the MQTT plugin on ``host:port``; same interface as ``MosquittoBroker``.

    ``port`` is the MQTT port; ``amqp_port``, ``dist_port`` and ``epmd_port`` are the others it opens.
    :meth:`stop` + :meth:`start` keep its data dir (retained messages, durable sessions). Measured: the MQTT
    plugin keeps retained messages in DETS, so ``stop(kill=True)`` loses the ones stored since its last sync.
    """

    KIND = "rabbitmq"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, state_dir: Path | None = None,
                 ready_timeout_s: float = 120.0) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.amqp_port = free_port(host)
        self.dist_port = free_port(host)
        self.epmd_port = free_port(host)
        self.node = f"megace-{uuid.uuid4().hex[:8]}@localhost"
        self.ready_timeout_s = ready_timeout_s
        super().__init__(state_dir, prefix="megace-rabbitmq-")
        self.config_path = self.state_dir / "rabbitmq.conf"
        self.log_dir = self.state_dir / "log"
        self._cookie = secrets.token_hex(16)
        self._epmd: subprocess.Popen[bytes] | None = None

    def environment(self) -> dict[str, str]:
        """What tells the server scripts to use our files and ports, never the system node's."""
        d = self.state_dir
        return {
            "HOME": str(d),  # the Erlang cookie is read from $HOME/.erlang.cookie
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": self.host,
            "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),  # not /etc/rabbitmq's (its node name)
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_USE_LONGNAME": "false",
            "RABBITMQ_CONFIG_FILE": str(self.config_path),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.log_dir),
            "RABBITMQ_PID_FILE": str(d / "rabbitmq.pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": f"-kernel inet_dist_use_interface {_erlang_ip(self.host)}",
        }

    def _write_files(self) -> None:
        d = self.state_dir
        d.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(exist_ok=True)
        (d / "rabbitmq-env.conf").write_text("")
        (d / "advanced.config").write_text("[].\n")
        (d / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        self.config_path.write_text(CONFIG_TEMPLATE.format(host=self.host, port=self.port, amqp_port=self.amqp_port))
        cookie = d / ".erlang.cookie"
        if not cookie.exists():  # Erlang refuses a cookie file others can read
            cookie.write_text(self._cookie)
            cookie.chmod(0o400)

    def start(self) -> Self:
        """Start epmd and the node; return once an MQTT CONNECT on ``port`` is accepted."""
        self._write_files()
        env = {**os.environ, **self.environment()}
        # our own epmd, in the foreground so it stays our child: left to itself, the node would start a
        # detached `epmd -daemon` that outlives it
        self._epmd = subprocess.Popen(["epmd", "-port", str(self.epmd_port), "-address", self.host],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_for_port(self.host, self.epmd_port)
        except TimeoutError:
            self.stop(kill=True)
            raise RuntimeError(f"epmd did not start on {self.host}:{self.epmd_port}") from None
        out = open(self.log_dir / "console.log", "ab")  # noqa: SIM115 - the child writes it all its life
        try:
            self._proc = subprocess.Popen([find_rabbitmq_server()], env=env, cwd=self.state_dir,
                                          stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
        finally:
            out.close()
        try:
            wait_for_port(self.host, self.port, timeout_s=self.ready_timeout_s)
            wait_mqtt_ready(self.host, self.port, timeout_s=self.ready_timeout_s)
        except TimeoutError as exc:
            tail = self.log_tail()
            self.stop(kill=True)
            raise RuntimeError(f"rabbitmq-server {self.node} not ready: {exc}\n{tail}") from None
        return self

    def log_tail(self, n: int = 3000) -> str:
        """The end of the node's logs (why it did not start)."""
        parts = []
        for path in sorted(self.log_dir.glob("*.log")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-n:]}")
        return "\n".join(parts)

    def stop(self, *, kill: bool = False) -> None:
        """Stop the node: SIGTERM (the script stops the VM cleanly) or ``kill=True``, SIGKILL to all of it."""
        if self._proc is not None:
            if self._proc.poll() is None:
                try:
                    if kill:  # the VM first, so that the script reaps it (killed together, init inherits it)
                        for child in _children(self._proc.pid) or [self._proc.pid]:
                            os.kill(child, signal.SIGKILL)
                    else:
                        self._proc.send_signal(signal.SIGTERM)
                    self._proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(self._proc.pid, signal.SIGKILL)
                    self._proc.wait()
                except ProcessLookupError:
                    pass
            with contextlib.suppress(ProcessLookupError):  # a port program the VM left behind
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc = None
        if self._epmd is not None:
            if self._epmd.poll() is None:
                self._epmd.kill()
            self._epmd.wait()
            self._epmd = None

