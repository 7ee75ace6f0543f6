"""One fleet run, in-process: the edge's training code and the cloud's aggregation code, no bus.

Why in-process: 13 arms x 3 settings x 5 seeds of 8+ edges through a broker and separate processes would
take most of a day on two cores; the learning is the same code either way. Each edge is the service's
:class:`~edge_agent.training.trainer.Trainer` (same model, optimizer, replay buffer, held-out split and
``apply_global``; the personalization variants subclass it in :mod:`megace.experiment.personalization`);
the cloud is the service's :class:`~cloud_aggregator.strategies.base.Strategy` (``aggregate`` then
``view_for`` each edge's rank, alpha and modalities). Left out: the wire (bytes are the float32 tensors an
upload or view carries, without envelope), the ledger, admission and staleness (every round is synchronous,
every upload accepted). ``device`` puts every edge's model and batches on CUDA (``megace experiment --fleet
--device cuda``, ``bench/bench_fleet_gpu.py``); what travels between edge and cloud is CPU tensors either way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.func import functional_call

from cloud_aggregator.contribution import Contribution, GlobalState
from cloud_aggregator.strategies import get_strategy
from megace.datasets.dataset import MultimodalDataset
from megace.datasets.fleet import Fleet, FleetSpec, build_fleet
from megace.datasets.partition import EdgeData
from megace.experiment.body_uplink import BodyCompressor, quantize
from megace.experiment.fleet_arms import FleetArm, FleetPlan, Setting
from megace.experiment.personalization import FleetTrainer
from megace_common.lora import add_peft_prefix, strip_peft_prefix
from megace_model.adapters import is_personal
from megace_model.config import EdgeModelConfig, ModalitySpec

GATE_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class FleetRun:
    """What one (setting, arm, seed) run contributes to the report; JSON round-trips."""

    setting: str
    arm: str
    seed: int
    personal: dict[str, float]  # edge -> accuracy on its own test split, after the last round
    global_: dict[str, float]  # edge -> accuracy on the global test (its modalities)
    modalities: dict[str, list[str]]
    train_sizes: dict[str, int]
    curve: list[float]  # mean personal accuracy per round
    late_curve: list[float]  # the late edge's personal accuracy after each of its rounds
    late_local: float = float("nan")  # the late edge after its first round, trained on its own data only
    upload_bytes: float = 0.0  # per round, all edges
    download_bytes: float = 0.0
    wall_s: float = 0.0
    gate: dict[str, float] = field(default_factory=dict)
    train_steps: int = 0  # optimizer steps over all edges (the late edge and its alone twin included)
    train_s: float = 0.0  # wall time inside Trainer.train_round (collation, steps, its held-out evaluation)
    mix_weights: dict[str, list[float]] = field(default_factory=dict)  # mix_grid: edge -> the fleet's weight/round

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FleetRun:
        return cls(**d)


def fleet_device(name: str) -> str:
    """``cpu`` / ``cuda`` / ``auto`` (CUDA when torch sees one) -> the device every edge of a run uses."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda or auto, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda: torch sees no CUDA device")
    return name


def _config(schema: MultimodalDataset, arm: FleetArm, rank: int, seed: int, backbone: str) -> EdgeModelConfig:
    return EdgeModelConfig(
        modalities={m: ModalitySpec(s.token_dim, s.tokens) for m, s in schema.modalities.items()},
        num_classes=len(schema.classes), lora_r=rank, lora_alpha=2 * rank,
        contrastive_weight=arm.contrastive_weight, seed=seed, backbone=backbone,  # type: ignore[arg-type]
    )


class SimEdge:
    """One edge: its trainer fed by its devices, its uploads, and installing what the cloud sends."""

    def __init__(self, name: str, data: EdgeData, schema: MultimodalDataset, arm: FleetArm, rank: int,
                 seed: int, plan: FleetPlan, device: str = "cpu") -> None:
        self.name, self.data, self.arm, self.rank, self.plan = name, data, arm, rank, plan
        self.trainer = FleetTrainer(_config(schema, arm, rank, seed, plan.backbone), lr=3e-3, device=device,
                                    personalization=arm.personalization)
        self.train_steps, self.train_s = 0, 0.0
        for dev in data.devices:
            for s in dev.train.samples:
                self.trainer.add_sample({"modalities": s["modalities"], "label": s["label"]},
                                        device_id=f"{name}-dev{dev.device_id}")
        self.counts = {m: len(data.train) for m in data.modalities}
        self.fleet_head: dict[str, torch.Tensor] | None = None
        self.compressor = BodyCompressor(arm.body_uplink) if arm.body_uplink.active else None
        self.mix_weights: list[float] = []  # mix_grid: the fleet's weight chosen at each round's start

    def train(self) -> None:
        t0 = time.perf_counter()  # train_round reads its losses back every step: no CUDA sync needed here
        if self.compressor is not None:  # the compressed update is measured from what the cloud sent
            reference = self.trainer.personal_state()
            reference.update(self.trainer.pending_personal or {})
            self.compressor.start_round(reference)
        metrics = self.trainer.train_round(steps=self.plan.steps, batch_size=self.plan.batch_size)
        if metrics["mix_weight"] is not None:
            self.mix_weights.append(metrics["mix_weight"])
        self.train_s += time.perf_counter() - t0
        self.train_steps += int(metrics["steps"])

    def upload(self, seq: int) -> tuple[Contribution, int]:
        t = self.trainer
        if self.compressor is not None:  # LoRA rounded to the uplink's bits, the body as low-rank updates
            bits = self.arm.body_uplink.bits
            lora = {k: quantize(v, bits) for k, v in t.shared_state().items()}
            body, nbytes = self.compressor.compress(t.personal_state())
            tensors = {k: v.numpy() for k, (v, _) in lora.items()}
            tensors.update({add_peft_prefix(k): v.numpy() for k, v in body.items()})
            nbytes += sum(n for _, n in lora.values())
        else:
            tensors = {k: v.numpy() for k, v in t.shared_state().items()}
            if self.arm.share_personal:
                tensors.update({add_peft_prefix(k): v.numpy() for k, v in t.personal_state().items()
                                if not (self.arm.keep_head and k.startswith("head."))})
            else:
                tensors.update({add_peft_prefix(k): v.numpy() for k, v in t.fleet_state().items()})
            nbytes = sum(a.nbytes for a in tensors.values())
        c = Contribution(self.name, seq, 0, self.rank, float(2 * self.rank), len(self.data.train), tensors,
                         dict(self.counts), t.fingerprint)
        return c, nbytes

    def install(self, view: dict[str, np.ndarray]) -> int:
        """What ``EdgeCore.apply`` does with a site view (plus the fleet modules); returns the bytes received."""
        shared = {k: v for k, v in view.items() if not is_personal(k)}
        personal = {strip_peft_prefix(k): v for k, v in view.items() if is_personal(k)}
        if self.arm.share_personal and personal:  # deferred with the adapter under defer_global (FedAvg-FT)
            own = self.trainer.personal_state()  # FedRep keeps its head: the fleet's subset over the own rest
            own.update({k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in personal.items()})
            self.trainer.apply_global(shared, strict=False, personal=own)
        else:
            self.trainer.apply_global(shared, strict=False)
        if self.trainer.personalization.active:
            self.trainer.apply_fleet(personal)
            self.fleet_head = {k.removeprefix("head."): torch.from_numpy(np.array(v, dtype=np.float32))
                               .to(self.trainer.device) for k, v in personal.items() if k.startswith("head.")}
        return sum(np.asarray(v).nbytes for v in view.values())

    # ---------------------------------------------------------------- evaluation
    def _probs(self, samples: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """Personal-head probabilities, fleet-head probabilities (None without one) and labels."""
        from megace_model.batch import collate

        model, head = self.trainer.model, self.trainer.model.get_base_model().head
        seen: list[torch.Tensor] = []
        hook = head.register_forward_hook(lambda _m, inp, _o: seen.append(inp[0]))
        p_own, p_fleet, labels = [], [], []
        try:
            for i in range(0, len(samples), 256):
                batch = collate(samples[i:i + 256], self.trainer.config)
                labels.append(batch.labels.numpy())
                batch = batch.to(self.trainer.device)
                with torch.no_grad():
                    model.eval()
                    p_own.append(torch.softmax(model(**batch.model_inputs()).logits, -1).cpu().numpy())
                    if self.fleet_head is not None:
                        logits = functional_call(head, self.fleet_head, (seen[-1],))
                        p_fleet.append(torch.softmax(logits, -1).cpu().numpy())
        finally:
            hook.remove()
        return np.concatenate(p_own), (np.concatenate(p_fleet) if p_fleet else None), np.concatenate(labels)

    def accuracy(self, ds: MultimodalDataset, gate: float | None = None) -> float:
        samples = [{"modalities": s["modalities"], "label": s["label"]}
                   for s in ds.with_modalities(self.data.modalities).samples]
        if not samples:
            return float("nan")
        own, fleet, labels = self._probs(samples)
        probs = own if gate is None or fleet is None else gate * own + (1 - gate) * fleet
        return float((probs.argmax(-1) == labels).mean())

    def fit_gate(self) -> float:
        """The gate weight (on the personal head) that does best on the edge's held-out buffer samples."""
        held = [s.as_sample() for s in self.trainer.split()[1]]
        if not held or self.fleet_head is None:
            return 1.0
        own, fleet, labels = self._probs(held)
        assert fleet is not None
        scores = [float(((g * own + (1 - g) * fleet).argmax(-1) == labels).mean()) for g in GATE_GRID]
        return GATE_GRID[int(np.argmax(scores))]


def _ranks(arm: FleetArm, edges: list[EdgeData]) -> list[int]:
    if not arm.adaptive_rank:
        return [arm.ranks[i % len(arm.ranks)] for i in range(len(edges))]
    order = np.argsort([-len(e.train) for e in edges], kind="stable")
    ranks = [0] * len(edges)
    for pos, i in enumerate(order):
        ranks[int(i)] = 8 if pos < len(edges) / 3 else 4 if pos < 2 * len(edges) / 3 else 2
    return ranks


def run_fleet(plan: FleetPlan, setting: Setting, arm: FleetArm, seed: int, fleet: Fleet | None = None,
              device: str = "cpu") -> FleetRun:
    """Rounds of train → upload → aggregate → install, with a late edge joining at ``plan.late_join``."""
    torch.manual_seed(seed)
    t0 = time.monotonic()
    fleet = fleet or build_fleet(FleetSpec(edges=plan.edges, devices_per_edge=plan.devices_per_edge,
                                           alpha=setting.alpha, feature_skew=setting.feature_skew,
                                           train_per_edge=plan.train_per_edge, n_voices=plan.n_voices,
                                           seed=seed))
    schema = fleet.global_test
    ranks = _ranks(arm, fleet.edges)
    edges = [SimEdge(f"edge-{e.edge_id}", e, schema, arm, r, seed, plan, device)
             for e, r in zip(fleet.edges, ranks, strict=True)]
    late = (SimEdge("edge-late", fleet.late, schema, arm, arm.ranks[0], seed, plan, device)
            if plan.late_join else None)
    strategy = get_strategy(arm.strategy) if arm.federated else None
    glob: GlobalState | None = None
    up = down = 0
    curve: list[float] = []
    late_curve: list[float] = []
    late_local = float("nan")
    for rnd in range(1, plan.rounds + 1):
        active = list(edges)
        if late is not None and rnd >= plan.late_join:
            if rnd == plan.late_join:
                if glob is not None and strategy is not None:  # a newcomer first installs the current global
                    down += late.install(strategy.view_for(glob, late.rank, late.counts, 2.0 * late.rank))
                else:
                    late_local = float("nan")
            active.append(late)
        for e in active:
            e.train()
        if strategy is not None:
            uploads = [e.upload(rnd) for e in active]
            up += sum(b for _, b in uploads)
            glob = strategy.aggregate(glob, [c for c, _ in uploads])
            for e in active:
                down += e.install(strategy.view_for(glob, e.rank, e.counts, 2.0 * e.rank))
        curve.append(float(np.mean([e.accuracy(e.data.test) for e in edges])))
        if late is not None and rnd >= plan.late_join:
            late_curve.append(late.accuracy(late.data.test))
    trained = list(edges)
    if late is not None:
        alone = SimEdge("edge-late-alone", fleet.late, schema, arm, arm.ranks[0], seed, plan, device)
        alone.train()
        late_local = alone.accuracy(alone.data.test)
        trained += [late, alone]
    gates = {e.name: e.fit_gate() for e in edges} if arm.gate else {}
    return FleetRun(
        setting=setting.name, arm=arm.name, seed=seed,
        personal={e.name: e.accuracy(e.data.test, gates.get(e.name)) for e in edges},
        global_={e.name: e.accuracy(fleet.global_test, gates.get(e.name)) for e in edges},
        modalities={e.name: list(e.data.modalities) for e in edges},
        train_sizes={e.name: len(e.data.train) for e in edges},
        curve=curve, late_curve=late_curve, late_local=late_local,
        upload_bytes=up / plan.rounds, download_bytes=down / plan.rounds,
        wall_s=time.monotonic() - t0, gate=gates,
        train_steps=sum(e.train_steps for e in trained), train_s=sum(e.train_s for e in trained),
        mix_weights={e.name: e.mix_weights for e in [*edges, *([late] if late else [])] if e.mix_weights},
    )
