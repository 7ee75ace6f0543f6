"""The arms of the comparison and the plan (tasks x arms x seeds) that ``megace experiment`` runs.

Every arm is the same closed loop (same data, partition, devices, bus, rounds, steps) with a few
settings changed, so differences come from the method and nothing else.

Baselines are *non-personalized*, as published: everything trainable leaves the edge
(``share_personal``), no contrastive term. "FedAvg of the full model" cannot be run literally (the
edge trains LoRA on a frozen base, never the base itself); it is approximated by full-rank LoRA
(r = hidden size, so every ΔW of the adapted matrices is reachable) aggregated with FlexLoRA, which
averages the products ΔW = BA exactly, plus every other trainable tensor averaged: that is FedAvg of
all adapted weight matrices and of the head/embeddings. The base's feed-forward layers stay frozen.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from megace.loop.settings import LoopSettings

BASELINE = {"share_personal": True, "contrastive_weight": 0.0}
MEGACE = {"strategy": "modality-aware", "contrastive_weight": 0.1}


@dataclass(frozen=True)
class Arm:
    name: str
    title: str
    group: str  # "baseline" | "megace" | "ablation"
    overrides: dict[str, Any] = field(default_factory=dict)

    def settings(self, base: LoopSettings, hidden: int) -> LoopSettings:
        o = dict(self.overrides)
        if o.pop("full_rank", False):
            o["ranks"] = (hidden,)
        return replace(base, **o, label=self.name)


ARMS: list[Arm] = [
    Arm("local-only", "Local only (no federation)", "baseline", {"local_only": True, "contrastive_weight": 0.0}),
    Arm("fedavg-full", "FedAvg, full model (approx.: full-rank LoRA, exact ΔW average)", "baseline",
        {**BASELINE, "strategy": "flexlora", "full_rank": True}),
    Arm("fedit", "FedIT (homogeneous LoRA r=8, FedAvg)", "baseline", {**BASELINE, "strategy": "fedavg",
                                                                       "ranks": (8,)}),
    Arm("hetlora", "HetLoRA (ranks 8/4/2)", "baseline", {**BASELINE, "strategy": "hetlora"}),
    Arm("flora", "FLoRA (stacking, ranks 8/4/2)", "baseline", {**BASELINE, "strategy": "flora"}),
    Arm("flexlora", "FlexLoRA (ΔW average + SVD, ranks 8/4/2)", "baseline", {**BASELINE, "strategy": "flexlora"}),
    Arm("megace", "megace: personal part kept + modality-aware + contrastive", "megace", dict(MEGACE)),
    Arm("megace-no-personal", "ablation: personal part shared too", "ablation", {**MEGACE, "share_personal": True}),
    Arm("megace-fedavg", "ablation: plain FedAvg instead of modality-aware", "ablation",
        {**MEGACE, "strategy": "fedavg"}),
    Arm("megace-no-contrastive", "ablation: no contrastive alignment", "ablation",
        {**MEGACE, "contrastive_weight": 0.0}),
]
ARM_BY_NAME = {a.name: a for a in ARMS}

#: The loop settings each task runs with (every arm, every seed).
TASKS: dict[str, LoopSettings] = {
    "basicmotions": LoopSettings(dataset="basicmotions", edges=3, devices_per_edge=2, alpha=0.5, rounds=5,
                                 steps_per_round=12, round_timeout_s=60.0),
    "digits-av": LoopSettings(dataset="digits-av", edges=3, devices_per_edge=2, alpha=0.5, rounds=5,
                              steps_per_round=12, max_samples=900, round_timeout_s=60.0),
}


@dataclass(frozen=True)
class ExperimentPlan:
    tasks: tuple[str, ...]
    arms: tuple[str, ...]
    seeds: tuple[int, ...]
    rounds: int = 5
    reduced: bool = False
    backbone: str = "tiny"

    @property
    def name(self) -> str:
        """Report base name: ``experiment``, ``experiment-quick``, ``experiment-minilm``..."""
        return "experiment" + ("-quick" if self.reduced else "") + ("" if self.backbone == "tiny" else
                                                                      f"-{self.backbone}")

    @classmethod
    def full(cls, seeds: int = 3, rounds: int = 5) -> ExperimentPlan:
        return cls(tuple(TASKS), tuple(a.name for a in ARMS), tuple(range(seeds)), rounds)

    @classmethod
    def quick_plan(cls) -> ExperimentPlan:
        """Minutes, not tens of minutes: one task, the key arms, one seed, three rounds."""
        return cls(("basicmotions",), ("local-only", "fedit", "megace", "megace-fedavg"), (0,), 3, reduced=True)

    def restricted(self, tasks: list[str] | None = None, arms: list[str] | None = None) -> ExperimentPlan:
        for t in tasks or []:
            if t not in TASKS:
                raise ValueError(f"unknown task {t!r}; known: {sorted(TASKS)}")
        for a in arms or []:
            if a not in ARM_BY_NAME:
                raise ValueError(f"unknown arm {a!r}; known: {[x.name for x in ARMS]}")
        return replace(self, tasks=tuple(tasks) if tasks else self.tasks, arms=tuple(arms) if arms else self.arms)

    def settings(self, task: str, arm: str, seed: int) -> LoopSettings:
        from megace_model.config import BACKBONE_HIDDEN

        base = replace(TASKS[task], seed=seed, rounds=self.rounds, global_eval=True, backbone=self.backbone)
        return ARM_BY_NAME[arm].settings(base, BACKBONE_HIDDEN[base.backbone])
