"""From per-run results to per-arm statistics (mean ± std over seeds)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from megace.loop.results import LoopResult


def mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.fmean(xs) if xs else math.nan


@dataclass
class RunMetrics:
    """The numbers one run contributes to the comparison."""

    task: str
    arm: str
    seed: int
    rounds_done: int
    personal_acc: float  # mean over edges of device-measured accuracy on each edge's own test split
    personal_per_edge: dict[str, float]
    global_acc: float  # mean over edges of accuracy on the whole test set
    missing_modality_acc: float  # mean over the edges that lack a modality
    curve: list[float]  # mean personal accuracy per round
    upload_bytes_per_round: float  # all edges, bytes on the wire (edge metrics)
    download_bytes_per_round: float
    upload_params: float  # numbers in one edge's upload, mean over uploads
    upload_pct: float  # upload_params / that edge's model parameters, %
    model_params: float
    wall_s: float
    stopped_because: str
    latency: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_result(cls, task: str, arm: str, seed: int, r: LoopResult) -> RunMetrics:
        final = r.final
        n_mod = max((len(e.modalities) for e in final.edges), default=0) if final else 0
        per_edge = {e.edge: e.device_acc for e in final.edges} if final else {}
        missing = [e.device_acc for e in final.edges if len(e.modalities) < n_mod] if final else []
        rounds = max(len(r.rounds), 1)
        up = sum(e.bytes_up or 0 for e in final.edges) / rounds if final else math.nan
        down = sum(e.bytes_down or 0 for e in final.edges) / rounds if final else math.nan
        pcts, params = [], []
        for u in r.uploads:
            total = r.params.get(u["edge"], {}).get("total")
            params.append(u["params"])
            if total:
                pcts.append(100 * u["params"] / total)
        totals = [p["total"] for p in r.params.values()]
        return cls(
            task=task, arm=arm, seed=seed, rounds_done=len(r.rounds),
            personal_acc=final.mean_acc if final else math.nan, personal_per_edge=per_edge,
            global_acc=_mean(list(r.global_acc.values())), missing_modality_acc=_mean(missing),
            curve=[x.mean_acc for x in r.rounds], upload_bytes_per_round=up, download_bytes_per_round=down,
            upload_params=_mean(params), upload_pct=_mean(pcts), model_params=_mean(totals),
            wall_s=r.wall_s, stopped_because=r.stopped_because,
            latency=[{"e2e": x.e2e, "uplink": x.uplink, "edge_time": x.edge_time, "downlink": x.downlink}
                     for x in r.latency],
        )


@dataclass
class ArmStats:
    task: str
    arm: str
    n: int
    personal: tuple[float, float]
    global_: tuple[float, float]
    missing: tuple[float, float]
    per_edge: dict[str, tuple[float, float]]
    curve: list[float]
    upload_bytes: float
    download_bytes: float
    upload_params: float
    upload_pct: float
    wall_s: float
    incomplete: int  # runs that stopped before the planned rounds


def arm_stats(runs: list[RunMetrics], planned_rounds: int) -> ArmStats:
    first = runs[0]
    edges = sorted({e for r in runs for e in r.personal_per_edge})
    longest = max(len(r.curve) for r in runs)
    curve = [_mean([r.curve[i] for r in runs if len(r.curve) > i]) for i in range(longest)]
    return ArmStats(
        task=first.task, arm=first.arm, n=len(runs),
        personal=mean_std([r.personal_acc for r in runs]),
        global_=mean_std([r.global_acc for r in runs]),
        missing=mean_std([r.missing_modality_acc for r in runs]),
        per_edge={e: mean_std([r.personal_per_edge.get(e, math.nan) for r in runs]) for e in edges},
        curve=curve,
        upload_bytes=_mean([r.upload_bytes_per_round for r in runs]),
        download_bytes=_mean([r.download_bytes_per_round for r in runs]),
        upload_params=_mean([r.upload_params for r in runs]),
        upload_pct=_mean([r.upload_pct for r in runs]),
        wall_s=_mean([r.wall_s for r in runs]),
        incomplete=sum(r.rounds_done < planned_rounds for r in runs),
    )
