"""Run every (setting, seed, arm) of a fleet plan, caching each run, then write the fleet report.

Each run's result is saved as it finishes (``runs/<plan name>/<setting>/<arm>-s<seed>.json``) and reused by a
later invocation with the same plan knobs (the cache key includes them), so a long run left in the background
survives a restart. The fleet of one (setting, seed) is built once and shared by every arm.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
from rich.console import Console

from megace.datasets.fleet import FleetSpec, build_fleet
from megace.experiment.fleet_arms import ARM_BY_NAME, FleetPlan
from megace.experiment.fleet_sim import FleetRun, fleet_device, run_fleet

log = logging.getLogger(__name__)


def plan_key(plan: FleetPlan) -> str:
    """What a cached run depends on besides (setting, arm, seed): every knob of the plan but the lists.

    Not the device: a run means the same on CPU or CUDA. The tiny backbone stays out of the key so the runs
    cached before the backbone became a knob are still found."""
    knobs = {k: v for k, v in asdict(plan).items() if k not in ("settings", "arms", "seeds", "reduced", "label")}
    if knobs.get("backbone") == "tiny":
        del knobs["backbone"]
    return hashlib.sha256(json.dumps(knobs, sort_keys=True).encode()).hexdigest()[:10]


def run_fleet_experiment(plan: FleetPlan, out: Path, *, console: Console | None = None,
                         work: Path = Path("runs"), fresh: bool = False, note: str = "",
                         cached_only: bool = False, device: str = "cpu") -> Path:
    """Run what is missing (``cached_only``: skip it) on ``device`` (cpu, cuda, auto), then write
    ``experiment-fleet[-quick][-minilm].md`` with its PNGs and JSON into ``out``."""
    from megace.experiment.fleet_report import write_fleet_report

    device = fleet_device(device)
    torch.set_num_threads(1)
    console = console or Console()
    base = work / "experiment-fleet" / plan_key(plan)
    runs: list[FleetRun] = []
    total = len(plan.settings) * len(plan.seeds) * len(plan.arms)
    done = 0
    t0 = time.monotonic()
    for setting in plan.settings:
        for seed in plan.seeds:
            fleet = None
            for arm in plan.arms:
                done += 1
                saved = base / setting.name / f"{arm}-s{seed}.json"
                if saved.exists() and not fresh:
                    run = FleetRun.from_json(json.loads(saved.read_text()))
                    how = "cached"
                elif cached_only:
                    continue
                else:
                    if fleet is None:
                        fleet = build_fleet(FleetSpec(edges=plan.edges, devices_per_edge=plan.devices_per_edge,
                                                      alpha=setting.alpha, feature_skew=setting.feature_skew,
                                                      train_per_edge=plan.train_per_edge,
                                                      n_voices=plan.n_voices, seed=seed))
                    run = run_fleet(plan, setting, ARM_BY_NAME[arm], seed, fleet, device)
                    saved.parent.mkdir(parents=True, exist_ok=True)
                    saved.write_text(json.dumps(run.to_json()))
                    how = f"{run.wall_s:.0f} s"
                runs.append(run)
                pers = sum(run.personal.values()) / max(len(run.personal), 1)
                glob = sum(run.global_.values()) / max(len(run.global_), 1)
                console.print(f"[{done}/{total}] {setting.name:9s} {arm:22s} seed {seed}: personal "
                              f"{100 * pers:5.1f}%  global {100 * glob:5.1f}%  ({how}; "
                              f"{time.monotonic() - t0:.0f} s so far)")
    machine = f"a {os.cpu_count()}-core CPU machine" if device == "cpu" else f"CUDA ({torch.cuda.get_device_name(0)})"
    return write_fleet_report(plan, runs, out, note=note, machine=machine)
