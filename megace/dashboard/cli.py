"""``megace dashboard`` and ``megace top``: watch the fleet from the broker (docs/METRICS.md).

Registered on the main ``megace`` app; only typer is imported here, the rest inside the commands.
"""

from __future__ import annotations

import time
from typing import Annotated

import typer


def dashboard(
    ws: Annotated[str, typer.Option(help="the broker's MQTT-over-WebSockets URL the page connects to "
                                    "(ws://… on loopback, wss://… elsewhere)")] = "ws://127.0.0.1:9001/",
    user: Annotated[str | None, typer.Option(help="broker user name (the read-only dashboard identity); the "
                                             "page asks for the password")] = None,
    host: Annotated[str, typer.Option(help="address the page is served on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="port the page is served on (0: a free one)")] = 8088,
) -> None:
    """Serve the web dashboard (static files from the package) and print its URL; it needs only the broker."""
    from megace.dashboard.server import DashboardServer

    server = DashboardServer(host, port).start()
    typer.echo(f"dashboard: {server.url(ws, user)}")
    typer.echo("the page subscribes read-only to megace/v1/{status,metrics,events}/#; Ctrl-C stops serving it")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


def top(
    broker: Annotated[str, typer.Option(help="broker URL (mqtt://user:pass@host:1883, mqtts://…?ca=…)")
                      ] = "mqtt://127.0.0.1:1883",
    once: Annotated[bool, typer.Option(help="collect for --wait seconds, print one screen and exit")] = False,
    wait: Annotated[float, typer.Option(min=0.0, help="with --once: seconds to collect first")] = 2.0,
    width: Annotated[int | None, typer.Option(help="screen width (default: the terminal's)")] = None,
) -> None:
    """The fleet in the terminal: cloud, sites, edges, devices, their state and figures, live."""
    from rich.console import Console

    from broker.address import BrokerAddress
    from megace.dashboard.top import run_top

    run_top(BrokerAddress.from_url(broker), once=once, wait_s=wait, console=Console(width=width))


def register(app: typer.Typer) -> None:
    app.command("dashboard")(dashboard)
    app.command("top")(top)
