"""``megace experiment``: the evaluation over the bus (``experiment.md``) and the in-process fleet benchmark
(``experiment-fleet*.md``).

Typer only at import time: torch, the datasets and matplotlib load inside the command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from megace.signals import stop_on_signals


def register(app: typer.Typer) -> None:
    app.command("experiment")(experiment)


def experiment(
    quick: Annotated[bool, typer.Option(help="a reduced run (one task, fewer arms and seeds) in minutes")] = False,
    tasks: Annotated[str, typer.Option(help="comma-separated datasets")] = "basicmotions,digits-av",
    seeds: Annotated[int | None, typer.Option(min=1, help="seeds per arm (default: 3; fleet: 5, quick: 1)")] = None,
    arms: Annotated[str | None, typer.Option(help="comma-separated arm names (default: all)")] = None,
    rounds: Annotated[int | None, typer.Option(min=1, help="rounds per run (default 5)")] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="fleet: optimizer steps per edge per round (default 10)")
                     ] = None,
    label: Annotated[str, typer.Option(help="fleet: report name suffix (experiment-fleet-<label>.md)")] = "",
    mosquitto: Annotated[bool, typer.Option(help="run on a private Mosquitto (default when installed) "
                                            "instead of the embedded broker")] = True,
    out: Annotated[Path, typer.Option(help="where experiment.md, its PNGs and JSON go")] = Path("reports"),
    note: Annotated[str, typer.Option(help="a provenance note printed under the report's title")] = "",
    backbone: Annotated[str, typer.Option(help="tiny, or minilm (slower; writes experiment[-fleet]-minilm.md)")
                        ] = "tiny",
    fleet: Annotated[bool, typer.Option(help="the fleet benchmark (mnist-av, 8+ edges, in-process edge and cloud "
                                        "cores; writes experiment-fleet.md); implied by the options below")] = False,
    alpha: Annotated[str | None, typer.Option(help="fleet: comma-separated Dirichlet alphas, inf = feature-skew "
                                              "setting (default: 0.1,0.5,inf)")] = None,
    edges: Annotated[int | None, typer.Option(min=2, help="fleet: edges (default 8)")] = None,
    devices_per_edge: Annotated[int | None, typer.Option(min=1, help="fleet: devices per edge (default 3)")] = None,
    device: Annotated[str | None, typer.Option(help="fleet: cpu, cuda or auto (CUDA when torch sees one; "
                                               "the default)")] = None,
) -> None:
    """Compare megace with local-only, FedIT, HetLoRA, FLoRA, FlexLoRA and ablations, over seeds."""
    from dataclasses import replace

    from rich.console import Console

    if (fleet or alpha is not None or edges is not None or devices_per_edge is not None or device is not None
            or steps is not None or label):
        _fleet_experiment(quick, seeds, arms, out, note, alpha, edges, devices_per_edge, backbone, device or "auto",
                          rounds, steps, label)
        return
    seeds = 3 if seeds is None else seeds

    from megace.experiment.plan import ExperimentPlan
    from megace.experiment.runner import run_experiment

    if backbone not in ("tiny", "minilm"):
        raise typer.BadParameter("backbone must be tiny or minilm", param_hint="--backbone")
    plan = ExperimentPlan.quick_plan() if quick else ExperimentPlan.full(seeds=seeds, rounds=rounds or 5)
    plan = replace(plan, backbone=backbone).restricted(tasks=[t for t in tasks.split(",") if t] if not quick else None,
                           arms=[a for a in arms.split(",") if a] if arms else None)
    console = Console()
    stop_on_signals()
    report = run_experiment(plan, out, console=console, mosquitto=mosquitto, note=note)
    console.print(f"Report: [bold]{report}[/]")


def _fleet_experiment(quick: bool, seeds: int | None, arms: str | None, out: Path, note: str, alpha: str | None,
                      edges: int | None, devices_per_edge: int | None, backbone: str, device: str,
                      rounds: int | None, steps: int | None, label: str) -> None:
    """``megace experiment --fleet``: see :mod:`megace.experiment.fleet_runner`."""
    from rich.console import Console

    from megace.experiment.fleet_arms import plan_from_options
    from megace.experiment.fleet_runner import run_fleet_experiment
    from megace.experiment.fleet_sim import fleet_device

    try:
        plan = plan_from_options(quick=quick, seeds=seeds, arms=arms, alpha=alpha, edges=edges,
                                 devices_per_edge=devices_per_edge, backbone=backbone, rounds=rounds,
                                 steps=steps, label=label)
        device = fleet_device(device)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    stop_on_signals()
    report = run_fleet_experiment(plan, out, console=Console(), note=note, device=device)
    Console().print(f"Report: [bold]{report}[/]")
