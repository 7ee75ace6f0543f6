"""The call sequence the MQTT service is meant to follow, end to end, including a restart."""

from __future__ import annotations

from pathlib import Path

import torch
from cloud_testkit import make_contribution

from cloud_aggregator.errors import RejectedUpdate
from cloud_aggregator.ledger import Ledger
from cloud_aggregator.server_opt import check_compatible, get_server_optimizer
from cloud_aggregator.staleness import BufferPolicy, Polynomial, StalenessPolicy
from cloud_aggregator.strategies import get_strategy
from cloud_aggregator.validation import AdapterSchema, NormGuard, Validator

MODS = {"enc.q": (8, 6), "enc.modality_proj.audio.0": (8, 4)}


class MiniService:
    """What the service does per message and per aggregation, minus MQTT."""

    def __init__(self, root: Path) -> None:
        self.ledger = Ledger(root)
        self.strategy = get_strategy("modality-aware", inner="fedavg")
        self.opt = get_server_optimizer("sgd", lr=1.0, momentum=0.0)
        check_compatible(self.strategy.factor_space, self.opt)
        self.opt.load_state_dict(self.ledger.server_state())
        self.glob = self.ledger.latest_global()
        self.version = 0 if self.glob is None else self.glob.version
        self.staleness = StalenessPolicy(Polynomial(a=0.5), max_staleness=2)
        schema = AdapterSchema.from_adapter(make_contribution(0, 4, MODS).tensors)
        self.validator = Validator(
            fingerprint="base",
            schema=schema,
            max_rank=8,
            norm_guard=NormGuard(min_history=3),
            seen=self.ledger.seen,
            last_seq=self.ledger.last_seq,
        )
        self.buffer = BufferPolicy(k=3)
        self.buffer.start(now=0.0, pending=self.ledger.pending_count())
        self.acks: list[tuple[str, int]] = []
        self.refusals: list[str] = []

    def on_update(self, c, now: float) -> None:
        try:
            norm = self.validator.validate(c)
            w = self.staleness.weight(self.version, c.base_version)
        except RejectedUpdate as e:
            self.ledger.reject(c.edge_id, c.seq, e.reason, e.detail, c.base_version, self.version)
            self.refusals.append(e.reason)
            return
        self.ledger.accept(c, received_version=self.version, weight=w, norm=norm)
        self.validator.accepted(norm)
        self.acks.append((c.edge_id, c.seq))  # only after the ledger returned
        self.buffer.arrived()
        if self.buffer.should_aggregate(now):
            self.aggregate(now)

    def aggregate(self, now: float) -> None:
        pend = self.ledger.pending()
        # staleness is re-evaluated at aggregation time (FedBuff), not only at arrival
        weights = [self.staleness.discount(self.version - p.contribution.base_version) for p in pend]
        agg = self.strategy.aggregate(self.glob, [p.contribution for p in pend], weights)
        agg.tensors = self.opt.step(self.glob.tensors if self.glob else {}, agg.tensors)
        self.ledger.commit_global(agg, [p.id for p in pend], self.opt.state_dict())
        self.glob, self.version = agg, agg.version
        self.buffer.aggregated(now)


def test_service_flow_with_restart(tmp_path: Path):
    svc = MiniService(tmp_path)
    for i in range(3):
        svc.on_update(make_contribution(i, 4, MODS, modalities={"audio": 2}, seq=1), now=float(i))
    assert svc.version == 1 and svc.ledger.pending_count() == 0
    svc.on_update(make_contribution(0, 4, MODS, seq=1), now=4.0)  # duplicate
    svc.on_update(make_contribution(5, 4, MODS, seq=1, fingerprint="other"), now=4.0)
    svc.on_update(make_contribution(6, 4, MODS, seq=1, base_version=7), now=4.0)  # from the future
    assert svc.refusals == ["duplicate", "base_fingerprint", "future_base"]
    svc.on_update(make_contribution(0, 4, MODS, seq=2, base_version=1), now=5.0)
    svc.on_update(make_contribution(1, 2, MODS, seq=2, base_version=0), now=6.0)  # stale by 1, lower rank
    acked = list(svc.acks)
    svc.ledger.close()  # crash/restart with two updates buffered

    svc2 = MiniService(tmp_path)
    assert svc2.version == 1 and svc2.buffer.pending == 2
    svc2.on_update(make_contribution(2, 4, MODS, seq=2, base_version=1), now=7.0)
    assert svc2.version == 2 and svc2.ledger.pending_count() == 0
    view = svc2.strategy.view_for(svc2.glob, rank=2, modalities={"image": 1}, alpha=4.0)
    assert set(view) == {"enc.q.lora_A.weight", "enc.q.lora_B.weight"}
    assert view["enc.q.lora_A.weight"].shape == (2, 6)
    assert acked == [("edge-0", 1), ("edge-1", 1), ("edge-2", 1), ("edge-0", 2), ("edge-1", 2)]
    # audio module: the v2 batch had no audio samples, so it kept the v1 value
    v1 = svc2.ledger.load_global(1)
    assert torch.equal(
        svc2.glob.tensors["enc.modality_proj.audio.0.lora_A.weight"],
        v1.tensors["enc.modality_proj.audio.0.lora_A.weight"],
    )
    svc2.ledger.close()
