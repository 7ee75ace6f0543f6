"""Run a Mosquitto broker as a child process on a loopback port (tests, benchmarks, ``megace run``).

The generated config lifts ``max_queued_messages`` because Mosquitto's default
(1000) silently drops QoS 0 messages to slow subscribers. It keeps a finite
``max_inflight_messages``: measured here, with an unlimited in-flight window a
SIGTERM'd Mosquitto 2.0.11 lost the QoS 1 messages it had in flight to a
persistent subscriber (108 of 1000); with 20 it redelivered them after restart.
``set_tcp_nodelay`` matters for request/response: without it the broker's write of a
request waits behind Nagle for the delayed ACK of its previous PUBACK, and a device's
inference round trip through an edge took about 40 ms instead of under 1 ms.

Persistence: started as root, Mosquitto drops to user ``mosquitto`` unless told otherwise, and
that user cannot write the 0700 temp state dir, so ``persistence true`` silently wrote nothing.
The config therefore names the current user (``user`` only matters when started as root).
Mosquitto 2.0 has no write-ahead log: it writes (and fsyncs) the whole database on each autosave.
Saving after every change (``autosave_on_changes=True, autosave_interval=1``, as in
``deploy/mosquitto/durability.conf``) shrinks what a SIGKILL loses to the PUBACKs of one event-loop
pass, but an fsync per pass cut one publisher from about 3,900 to 130 acknowledged records/s on
this machine's disk (bench/results/durability.json); the shared test broker therefore keeps a save
per second, and the reliability tests ask for the per-change saves.
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path

from broker.address import BrokerAddress
from broker.capabilities import started_address
from broker.runners.ports import free_port
from broker.runners.process import MosquittoProcess

CONFIG_TEMPLATE = """\
listener {port} {host}
allow_anonymous true
max_queued_messages 0
max_inflight_messages 20
set_tcp_nodelay true
persistence {persistence}
persistence_location {state_dir}/
autosave_interval {autosave_interval}
autosave_on_changes {autosave_on_changes}
user {user}
log_dest stderr
log_type error
log_type warning
"""


def _current_user() -> str:
    """Who the broker should stay: as root, Mosquitto would otherwise drop to ``mosquitto``."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:  # a uid without a passwd entry (containers): only root would switch, and root has one
        return "root" if os.geteuid() == 0 else "mosquitto"


class MosquittoBroker(MosquittoProcess):
    """A private Mosquitto on ``host:port``; :meth:`stop` + :meth:`start` keep its persistence."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, persistence: bool = True,
                 state_dir: Path | None = None, autosave_interval: int = 1,
                 autosave_on_changes: bool = False) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.persistence = persistence
        # on_changes: save after ``autosave_interval`` changes; otherwise every ``autosave_interval`` seconds
        self.autosave_interval = autosave_interval
        self.autosave_on_changes = autosave_on_changes
        super().__init__(state_dir, prefix="megace-mosquitto-")
        self.db_path = self.state_dir / "mosquitto.db"  # written on autosave and on SIGTERM

    @property
    def address(self) -> BrokerAddress:
        """How to reach it: no protocol of its own (Mosquitto has MQTT 5, so the client's setting applies)."""
        return started_address("mosquitto", self.host, self.port)

    @property
    def url(self) -> str:
        return self.address.url()

    def start(self) -> MosquittoBroker:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            CONFIG_TEMPLATE.format(
                port=self.port, host=self.host, state_dir=self.state_dir,
                persistence="true" if self.persistence else "false",
                autosave_interval=self.autosave_interval,
                autosave_on_changes="true" if self.autosave_on_changes else "false",
                user=_current_user(),
            )
        )
        self._launch(self.host, [self.port], "mosquitto")
        return self
