"""The arms of the fleet benchmark and its plan (settings x seeds x arms).

Every arm runs the same fleet (data, partition, devices, rounds, steps, seeds); only the method differs.
Baselines share everything trainable, as published; megace keeps its personal part at the edge, and the
personalization ablations (:mod:`megace.experiment.personalization`) choose which of it travels.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

from edge_agent.training.adaptive_mix import MIX_GRID
from megace.experiment.body_uplink import BodyUplink
from megace.experiment.personalization import Personalization
from megace_model.config import BACKBONE_HIDDEN


@dataclass(frozen=True)
class FleetArm:
    name: str
    title: str
    group: str  # "baseline" | "megace" | "ablation"
    strategy: str = "modality-aware"
    local_only: bool = False
    share_personal: bool = False  # everything trainable is uploaded and replaced by the aggregate
    keep_head: bool = False  # with share_personal: the head stays personal (FedRep)
    contrastive_weight: float = 0.1
    ranks: tuple[int, ...] = (8, 4, 2)
    adaptive_rank: bool = False  # rank by the edge's data: the largest third 8, the middle 4, the rest 2
    personalization: Personalization = field(default_factory=Personalization)
    gate: bool = False  # at prediction: mix the personal head's and the fleet head's probabilities
    body_uplink: BodyUplink = field(default_factory=BodyUplink)  # with share_personal: a low-rank body upload

    @property
    def federated(self) -> bool:
        return not self.local_only


HEAD = ("head",)
BODY = ("cross_modal", "modality_embed", "position_embed", "cls_token")
BASE = {"share_personal": True, "contrastive_weight": 0.0}
#: the candidate kept if the paired comparison says so (reports/experiment-fleet.md): the head travels and
#: every round starts from the fleet's head, then is fine-tuned on the site (FedBABU/FedRep-style)
HEAD_INIT = Personalization(fleet_modules=HEAD, mix=1.0)
#: adaptive local aggregation: each round starts from the mix of the fleet's and the site's model (one weight
#: of this grid, chosen on the site's held-out samples) instead of from the fleet's model
ALA = Personalization(defer_global=True, mix_grid=MIX_GRID)
#: megace-ala: everything shared at LoRA-like traffic (int8 rank-8 LoRA, int8 rank-4 body updates), adaptive start
MEGACE_ALA = {"share_personal": True, "ranks": (8,), "personalization": ALA,
              "body_uplink": BodyUplink(rank=4, bits=8)}

ARMS: list[FleetArm] = [
    FleetArm("local-only", "Local only (no federation)", "baseline", local_only=True, contrastive_weight=0.0),
    FleetArm("fedit", "FedIT (everything shared, LoRA r=8, FedAvg)", "baseline", strategy="fedavg", ranks=(8,),
             **BASE),
    FleetArm("fedit-ft", "FedIT + fine-tuning (FedAvg-FT): serve the site-tuned model, the fleet's starts the next "
             "round", "baseline", strategy="fedavg", ranks=(8,), personalization=Personalization(defer_global=True),
             **BASE),
    FleetArm("fedit-ala", "FedIT + adaptive local aggregation: a round starts from the fleet/own mix that does best "
             "on held-out (FedALA-style)", "baseline", strategy="fedavg", ranks=(8,), personalization=ALA, **BASE),
    FleetArm("flexlora", "FlexLoRA (everything shared, ranks 8/4/2)", "baseline", strategy="flexlora", **BASE),
    FleetArm("fedrep", "FedRep: all but the head shared, head personal", "baseline", strategy="fedavg",
             keep_head=True, **BASE),
    FleetArm("megace", "megace as committed: LoRA shared, personal part private", "megace"),
    FleetArm("megace-body", "megace + body shared as rank-2 float16 updates, fine-tuned on the site (FedAvg-FT)",
             "megace", share_personal=True, personalization=Personalization(defer_global=True),
             body_uplink=BodyUplink(rank=2)),
    FleetArm("megace-ala", "megace + everything shared, body as rank-4 int8 updates, LoRA int8 r=8; a round starts "
             "from the fleet/own mix that does best on held-out", "megace", **MEGACE_ALA),
    FleetArm("megace-ala-fedavg", "megace-ala, plain FedAvg instead of modality-aware", "ablation",
             strategy="fedavg", **MEGACE_ALA),
    FleetArm("megace-ala-842", "megace-ala with LoRA ranks 8/4/2 and float16 rank-2 body updates", "ablation",
             share_personal=True, personalization=ALA, body_uplink=BodyUplink(rank=2)),
    FleetArm("megace-fedavg", "megace, plain FedAvg instead of modality-aware", "ablation", strategy="fedavg"),
    FleetArm("megace-no-contrastive", "megace without contrastive alignment", "ablation", contrastive_weight=0.0),
    FleetArm("local-contrastive", "local only, with megace's contrastive term (a control)", "ablation",
             local_only=True),
    FleetArm("adaptive-rank", "megace + rank by the edge's data (8/4/2)", "ablation", adaptive_rank=True),
    FleetArm("head-init", "megace + head from the fleet's at each round's start (FedBABU/FedRep)", "ablation",
             personalization=HEAD_INIT),
    FleetArm("head-mix", "megace + head blended 50/50 with the fleet's", "ablation",
             personalization=Personalization(fleet_modules=HEAD, mix=0.5)),
    FleetArm("ditto", "megace + own head pulled to the fleet's (Ditto, prox 0.5)", "ablation",
             personalization=Personalization(fleet_modules=HEAD, mix=0.0, prox=0.5)),
    FleetArm("gate", "head-init + gate between personal and fleet head", "ablation", personalization=HEAD_INIT,
             gate=True),
    FleetArm("megace-ft", "megace + serve the site-tuned adapter, the global starts the next round", "ablation",
             personalization=Personalization(defer_global=True)),
    FleetArm("head-init-ft", "head-init + serve site-tuned, head and adapter from the fleet at round start",
             "ablation", personalization=Personalization(fleet_modules=HEAD, mix=1.0, defer_global=True)),
    FleetArm("shared-body", "head-init + body kept at its shared seeded init", "ablation",
             personalization=Personalization(fleet_modules=HEAD, mix=1.0, frozen=BODY)),
]
ARM_BY_NAME = {a.name: a for a in ARMS}
MAIN_ARMS = ("local-only", "fedit", "fedit-ft", "fedit-ala", "megace", "megace-fedavg", "head-init", "megace-ft",
             "megace-body", "megace-ala-842", "megace-ala", "megace-ala-fedavg")
FULL_ARMS = tuple(a.name for a in ARMS)
QUICK_ARMS = ("local-only", "fedit", "megace", "megace-ala")


@dataclass(frozen=True)
class Setting:
    """One heterogeneity setting of the fleet."""

    name: str
    alpha: float
    feature_skew: float


SETTINGS: dict[str, Setting] = {
    "alpha0.1": Setting("alpha0.1", 0.1, 0.5),
    "alpha0.5": Setting("alpha0.5", 0.5, 0.5),
    "feature": Setting("feature", math.inf, 1.5),
}


@dataclass(frozen=True)
class FleetPlan:
    settings: tuple[Setting, ...]
    arms: tuple[str, ...]
    seeds: tuple[int, ...]
    edges: int = 8
    devices_per_edge: int = 3
    rounds: int = 5
    steps: int = 10
    batch_size: int = 32
    train_per_edge: int = 160
    late_join: int = 3  # the late edge joins at this round (1-based); 0: none
    n_voices: int = 60  # espeak-ng voices of mnist-av (fewer: a faster first build, for tests)
    reduced: bool = False
    label: str = ""  # a suffix for the report's name (e.g. "ablation"); runs are shared through the cache
    backbone: str = "tiny"  # "tiny" (seeded random BERT) or "minilm" (pretrained all-MiniLM-L6-v2)

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONE_HIDDEN:
            raise ValueError(f"unknown backbone {self.backbone!r}; known: {sorted(BACKBONE_HIDDEN)}")

    @property
    def name(self) -> str:
        return ("experiment-fleet" + ("-quick" if self.reduced else "") + (f"-{self.label}" if self.label else "")
                + ("" if self.backbone == "tiny" else f"-{self.backbone}"))

    @classmethod
    def full(cls, seeds: int = 5, alphas: tuple[float, ...] | None = None, edges: int = 8,
             devices_per_edge: int = 3) -> FleetPlan:
        """The main comparison (``MAIN_ARMS``); ``--arms`` adds or picks others (the ablations)."""
        return cls(_settings(alphas), MAIN_ARMS, tuple(range(seeds)), edges=edges, devices_per_edge=devices_per_edge)

    @classmethod
    def quick(cls, seeds: int = 1, alphas: tuple[float, ...] | None = None, edges: int = 8,
              devices_per_edge: int = 2) -> FleetPlan:
        """Under 5 minutes on 2 cores: alpha 0.1 only (unless given), the key arms, few rounds."""
        chosen = _settings(alphas) if alphas else (SETTINGS["alpha0.1"],)
        return cls(chosen, QUICK_ARMS, tuple(range(seeds)), edges=edges, devices_per_edge=devices_per_edge,
                   rounds=3, steps=8, late_join=2, reduced=True)

    def restricted(self, arms: list[str] | None) -> FleetPlan:
        for a in arms or []:
            if a not in ARM_BY_NAME:
                raise ValueError(f"unknown arm {a!r}; known: {list(ARM_BY_NAME)}")
        return replace(self, arms=tuple(arms)) if arms else self


def _settings(alphas: tuple[float, ...] | None) -> tuple[Setting, ...]:
    if not alphas:
        return tuple(SETTINGS.values())
    out = []
    for a in alphas:
        if not a > 0:
            raise ValueError(f"alpha must be > 0, got {a}")
        out.append(SETTINGS["feature"] if math.isinf(a) else Setting(f"alpha{a:g}", a, 0.5))
    return tuple(out)


def plan_from_options(*, quick: bool, seeds: int | None, arms: str | None, alpha: str | None, edges: int | None,
                      devices_per_edge: int | None, backbone: str = "tiny", rounds: int | None = None,
                      steps: int | None = None, label: str = "") -> FleetPlan:
    """What ``megace experiment --fleet`` runs for its options (``ValueError`` on a bad one).

    ``rounds`` and ``steps`` change the horizon (the late edge still joins at the plan's round); ``label`` names
    the report (``experiment-fleet-<label>.md``) so that a longer run does not overwrite the main one."""
    alphas = tuple(float(a) for a in alpha.split(",") if a.strip()) if alpha else None
    if edges is not None and edges < 2:
        raise ValueError("a fleet needs >= 2 edges")
    if devices_per_edge is not None and devices_per_edge < 1:
        raise ValueError("devices per edge must be >= 1")
    make = FleetPlan.quick if quick else FleetPlan.full
    plan = make(seeds=seeds or (1 if quick else 5), alphas=alphas, edges=edges or 8,
                devices_per_edge=devices_per_edge or (2 if quick else 3))
    if rounds is not None and rounds < plan.late_join:
        raise ValueError(f"rounds must be >= {plan.late_join} (the round the late edge joins)")
    if steps is not None and steps < 1:
        raise ValueError("steps must be >= 1")
    if label and not re.fullmatch(r"[a-z0-9][a-z0-9-]*", label):
        raise ValueError(f"label must be lower-case letters, digits and dashes, got {label!r}")
    plan = replace(plan, backbone=backbone, rounds=rounds or plan.rounds, steps=steps or plan.steps,
                   label=label)
    return plan.restricted([a.strip() for a in arms.split(",") if a.strip()] if arms else None)
