"""Brokers with an MQTT-over-WebSockets listener next to their TCP one, for the browser dashboard.

Mosquitto 2.0.11 binds a ``protocol websockets`` listener on every interface even when given an address
(deploy/dashboard/README.md): these runners are for loopback tests and demos on a trusted machine;
production puts the listener behind TLS and the read-only dashboard identity.
"""

from __future__ import annotations

from broker.runners.mosquitto import CONFIG_TEMPLATE, MosquittoBroker, _current_user
from broker.runners.ports import free_port


class WebSocketMosquitto(MosquittoBroker):
    """A private Mosquitto (TCP on ``port``) with a WebSockets listener on ``ws_port``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, ws_port: int = 0, **kwargs: object) -> None:
        super().__init__(host, port, persistence=False, **kwargs)  # type: ignore[arg-type]
        self.ws_port = ws_port or free_port(host)

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.ws_port}/"

    def start(self) -> WebSocketMosquitto:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        conf = CONFIG_TEMPLATE.format(
            port=self.port, host=self.host, state_dir=self.state_dir, persistence="false",
            autosave_interval=self.autosave_interval, autosave_on_changes="false", user=_current_user())
        conf += f"listener {self.ws_port} {self.host}\nprotocol websockets\n"
        self.config_path.write_text(conf)
        self._launch(self.host, [self.port, self.ws_port], "mosquitto")
        return self
