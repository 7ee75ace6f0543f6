"""Run every (task, seed, arm) closed loop, one after another, and write the comparison report.

Each run's result is saved as soon as it finishes (``runs/experiment/<task>/<arm>-s<seed>.json``) and
reused by a later invocation, so a full experiment left running in the background survives being
stopped and restarted. Runs go through a private Mosquitto (a separate process, as in production)
when it is installed, else through the embedded broker.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from rich.console import Console

from megace.experiment.plan import ExperimentPlan
from megace.experiment.summary import RunMetrics
from megace.loop.results import LoopResult
from megace.loop.runner import LoopError, run_loop

log = logging.getLogger(__name__)


def _mosquitto_available() -> bool:
    from broker.runners import find_mosquitto

    try:
        find_mosquitto()
    except FileNotFoundError:
        return False
    return True


def run_one(plan: ExperimentPlan, task: str, arm: str, seed: int, work: Path, broker_kind: str) -> LoopResult:
    settings = plan.settings(task, arm, seed)
    settings.out = work / task / f"{arm}-s{seed}"
    settings.broker_kind = broker_kind
    return run_loop(settings)


def run_experiment(plan: ExperimentPlan, out: Path, *, console: Console | None = None, mosquitto: bool = True,
                   work: Path = Path("runs/experiment"), fresh: bool = False, note: str = "") -> Path:
    """Run what is missing, then write ``experiment[-quick].md`` with its PNGs and JSON into ``out``."""
    from megace.experiment.report import write_experiment_report

    console = console or Console()
    broker_kind = "mosquitto" if mosquitto and _mosquitto_available() else "embedded"
    work = work / plan.name
    metrics: list[RunMetrics] = []
    total = len(plan.tasks) * len(plan.seeds) * len(plan.arms)
    done = 0
    t0 = time.monotonic()
    for task in plan.tasks:
        for seed in plan.seeds:
            for arm in plan.arms:
                done += 1
                saved = work / task / f"{arm}-s{seed}.json"
                if saved.exists() and not fresh:
                    result = LoopResult.from_json(json.loads(saved.read_text()))
                    how = "cached"
                else:
                    try:
                        result = run_one(plan, task, arm, seed, work, broker_kind)
                    except LoopError as exc:
                        console.print(f"[red]{task} {arm} seed {seed} failed:[/] {exc}")
                        log.error("%s %s seed %d failed: %s", task, arm, seed, exc)
                        continue
                    saved.parent.mkdir(parents=True, exist_ok=True)
                    result.write(saved)
                    how = f"{result.wall_s:.0f} s"
                m = RunMetrics.from_result(task, arm, seed, result)
                metrics.append(m)
                console.print(f"[{done}/{total}] {task:12s} {arm:22s} seed {seed}: personal "
                              f"{100 * m.personal_acc:5.1f}%  global {100 * m.global_acc:5.1f}%  "
                              f"({m.rounds_done} rounds, {how}; {time.monotonic() - t0:.0f} s so far)")
    return write_experiment_report(plan, metrics, out, broker_kind=broker_kind, note=note)
