"""The embedded default broker: amqtt, in-process, no system package needed.

It lets ``megace run`` work with zero set-up. Limits to know: MQTT 3.1.1 only
(no v5, no shared subscriptions), a few thousand messages per second, and
clients must set TCP_NODELAY (megace's clients do) or QoS 1 stalls ~40 ms. It acknowledges a QoS 1
publish before acting on it and drops what is still queued when the client disconnects, so a client that
disconnects right after its PUBACKs can lose its last messages (``megace.loop.retained.clear_retained``
checks its deletes for that reason). Use Mosquitto (or EMQX) in production.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from types import TracebackType
from typing import Any

from broker.capabilities import StartedBroker
from broker.runners.ports import free_port

log = logging.getLogger(__name__)


def _config(host: str, port: int, ws_port: int | None = None) -> dict[str, Any]:
    listeners: dict[str, Any] = {"default": {"type": "tcp", "bind": f"{host}:{port}"}}
    if ws_port:  # MQTT over WebSockets for the browser dashboard, on the same (loopback) host
        listeners["ws"] = {"type": "ws", "bind": f"{host}:{ws_port}"}
    return {
        "listeners": listeners,
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


class EmbeddedBroker(StartedBroker):
    """An amqtt broker on ``host:port`` (port 0 picks a free one).

    Use ``async with`` inside a running event loop, or ``with`` / :meth:`start`
    from synchronous code, which runs the broker's loop in a named daemon thread.
    """

    KIND = "embedded"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, ws_port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.ws_port = ws_port  # a WebSockets listener too (the dashboard's), on ``host``; None: none
        self._broker: Any = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start_async(self) -> None:
        from amqtt.broker import Broker  # heavy import, only when a broker is really wanted

        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self._broker = Broker(_config(self.host, self.port, self.ws_port))
        await self._broker.start()
        log.info("embedded broker listening on %s:%d", self.host, self.port)

    async def stop_async(self) -> None:
        if self._broker is not None:
            await self._broker.shutdown()
            self._broker = None

    async def __aenter__(self) -> EmbeddedBroker:
        await self.start_async()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop_async()

    def start(self) -> EmbeddedBroker:
        """Run the broker in a background thread; returns once it accepts connections."""
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self.start_async())
            except BaseException as exc:  # surface start-up failures to the caller
                failure.append(exc)
                started.set()
                return
            started.set()
            loop.run_forever()
            loop.run_until_complete(self.stop_async())
            loop.close()

        self._thread = threading.Thread(target=run, name=f"embedded-broker:{self.port}", daemon=True)
        self._thread.start()
        started.wait(30)
        if failure:
            raise RuntimeError(f"embedded broker failed to start: {failure[0]}") from failure[0]
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
