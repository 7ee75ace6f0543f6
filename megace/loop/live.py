"""Live terminal view of a loop run (rich): a status line and a table that grows by one row per round."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from megace.loop.results import LoopResult, RoundRecord


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _kib(x: float | None) -> str:
    return "-" if x is None else f"{x / 1024:.0f}"


def _ms(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.1f}"


def rounds_table(rounds: list[RoundRecord], title: str = "closed loop") -> Table:
    """One row per round: global version, each edge's device-measured accuracy, traffic, latency."""
    t = Table(title=title, title_justify="left", header_style="bold")
    t.add_column("round", justify="right")
    t.add_column("global v", justify="right")
    edges = rounds[0].edges if rounds else []
    for e in edges:
        t.add_column(f"{e.edge} r{e.rank}\n{'+'.join(e.modalities)}\nacc % dev/held", justify="right")
    t.add_column("mean\nacc %", justify="right", style="bold")
    t.add_column("KiB up/down\nall edges", justify="right")
    t.add_column("p50\nms", justify="right")
    t.add_column("t s", justify="right")
    for r in rounds:
        up = sum(e.bytes_up or 0 for e in r.edges)
        down = sum(e.bytes_down or 0 for e in r.edges)
        lat = [e.latency_ms_p50 for e in r.edges if not math.isnan(e.latency_ms_p50)]
        t.add_row(
            str(r.round), "-" if r.global_version is None else str(r.global_version),
            *[f"{_pct(e.device_acc)}/{_pct(e.heldout_acc)}" for e in r.edges],
            _pct(r.mean_acc), f"{_kib(up)}/{_kib(down)}", _ms(sorted(lat)[len(lat) // 2] if lat else None),
            f"{r.elapsed_s:.0f}",
        )
    return t


class LiveView:
    """The progress callback of :func:`megace.loop.runner.run_loop`, drawing with rich."""

    def __init__(self, console: Console | None = None, title: str = "megace closed loop") -> None:
        self.console = console or Console()
        self.title = title
        self.rounds: list[RoundRecord] = []
        self.status = "starting…"
        self._live = Live(self._render(), console=self.console, refresh_per_second=4, transient=False)

    def _render(self) -> Group:
        parts: list[Any] = []
        if self.rounds:
            parts.append(rounds_table(self.rounds, self.title))
        parts.append(Spinner("dots", text=Text(self.status, style="cyan")))
        return Group(*parts)

    def __call__(self, kind: str, payload: Any) -> None:
        if kind == "status":
            self.status = str(payload)
        elif kind == "round":
            self.rounds.append(payload)
        self._live.update(self._render())

    def __enter__(self) -> LiveView:
        self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.status = "done"
        self._live.update(Group(rounds_table(self.rounds, self.title)) if self.rounds else Group())
        self._live.stop()


def summary_table(result: LoopResult) -> Table:
    """The end-of-run summary: final accuracy per edge (personal and global), traffic and latency."""
    t = Table(title="summary", title_justify="left", header_style="bold")
    for col in ("edge", "rank", "modalities", "personal\nacc %", "global\nacc %", "held-out\n%", "KiB\nup",
                "KiB\ndown", "latency ms\np50/p95"):
        t.add_column(col, justify="right" if col not in ("edge", "modalities") else "left")
    final = result.final
    if final is None:
        return t
    for e in final.edges:
        t.add_row(e.edge, str(e.rank), "+".join(e.modalities), _pct(e.device_acc),
                  _pct(result.global_acc.get(e.edge)), _pct(e.heldout_acc), _kib(e.bytes_up), _kib(e.bytes_down),
                  f"{_ms(e.latency_ms_p50)}/{_ms(e.latency_ms_p95)}")
    return t
