"""Serve the dashboard page on loopback: static files only, from the package (no CDN, no download).

The page itself talks to the broker (MQTT over WebSockets); this server only hands out HTML, JS and
CSS, so it has no state, takes no input beyond the path, and binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlencode


def static_dir() -> Path:
    """The page's folder inside the installed package."""
    return Path(str(resources.files("megace.dashboard").joinpath("static")))


class _Quiet(SimpleHTTPRequestHandler):
    """Static files with no per-request log line (a page polls nothing, but a terminal stays readable)."""

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")
        super().end_headers()


class DashboardServer:
    """The page on ``http://host:port/`` in a daemon thread (port 0 picks a free one)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        handler = functools.partial(_Quiet, directory=str(static_dir()))
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.host, self.port = self.httpd.server_address[0], int(self.httpd.server_address[1])
        self._thread: threading.Thread | None = None

    def url(self, ws_url: str | None = None, user: str | None = None) -> str:
        """The page's address, pointed at a broker's WebSockets URL (and user name) when given."""
        query = {k: v for k, v in (("ws", ws_url), ("user", user)) if v}
        return f"http://{self.host}:{self.port}/index.html" + (f"?{urlencode(query)}" if query else "")

    def start(self) -> DashboardServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="megace-dashboard", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> DashboardServer:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
