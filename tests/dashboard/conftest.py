"""One shrunken closed loop for the dashboard tests, on a Mosquitto of their own with a WebSockets listener.

The loop's real edge processes, cloud process and SDK devices publish status, metrics and events; a raw
subscriber records every dashboard message live, and a headless Chromium has the dashboard page open on
the broker's WebSockets listener during the whole run, so the page sees rounds complete as they happen.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from broker.address import BrokerAddress
from megace.dashboard.brokers import WebSocketMosquitto
from megace.loop.runner import run_loop
from megace.loop.settings import LoopSettings
from tests.dashboard.fleetkit import CHROMIUM_ARGS, DEVICES_PER_EDGE, EDGES, ROUNDS, Fleet, Recorder


@pytest.fixture(scope="session")
def playwright() -> Iterator[Any]:
    """One Playwright for the dashboard tests (a second ``sync_playwright()`` cannot start beside it). Its sync API
    keeps an event loop marked running in the main thread while started, which would fail any asyncio test after
    it: tests/conftest.py hides that mark outside the dashboard tests, so it is set again here before stopping
    (a session fixture may be torn down in another test's teardown)."""
    from playwright.sync_api import sync_playwright

    manager = sync_playwright()
    pw = manager.__enter__()
    loop = asyncio._get_running_loop()
    try:
        yield pw
    finally:
        asyncio._set_running_loop(loop)
        manager.__exit__(None, None, None)


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory, playwright: Any) -> Iterator[Fleet]:
    from megace.dashboard.server import DashboardServer

    pw = playwright
    with WebSocketMosquitto() as broker, DashboardServer() as server:
        addr = BrokerAddress(broker.host, broker.port)
        rec = Recorder(addr)
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page_errors: list[str] = []
            page.on("pageerror", lambda exc: page_errors.append(str(exc)))
            url = server.url(broker.ws_url)
            page.goto(url)
            page.wait_for_function("window.megace && window.megace.state.connected", timeout=20_000)
            settings = LoopSettings(
                dataset="basicmotions", dataset_options={"augment": 0}, max_samples=None, edges=EDGES,
                devices_per_edge=DEVICES_PER_EDGE, alpha=1.0, ranks=(4, 2), rounds=ROUNDS, steps_per_round=10,
                strategy="modality-aware", broker_url=str(addr), out=tmp_path_factory.mktemp("loop"),
                round_timeout_s=60.0, services_timeout_s=60.0, time_limit_s=150.0, global_eval=False,
            )
            result = run_loop(settings)
            assert len(result.rounds) == ROUNDS, result.stopped_because
            yield Fleet(broker, addr, result, rec.snapshot(), page, url, page_errors)
        finally:
            rec.stop()
            browser.close()
