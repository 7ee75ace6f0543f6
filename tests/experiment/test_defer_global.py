"""The kept personalization: ``Trainer(defer_global=True)`` / ``[training] defer_global`` keeps serving the
site-tuned adapter and starts the next round from the cloud's global (reports/experiment-fleet.md)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from edge_agent.checkpoints import build_trainer
from edge_agent.config import EdgeConfig
from edge_agent.training.toy_task import ToyTask, toy_config
from edge_agent.training.trainer import Trainer
from megace_model.errors import NonFiniteAdapterError


def _trained(defer: bool, seed: int = 0) -> Trainer:
    torch.manual_seed(0)
    t = Trainer(toy_config(seed=1), device="cpu", lr=1e-2, defer_global=defer)
    for s in ToyTask(toy_config(seed=1), seed=seed).samples(40):
        t.add_sample(s)
    t.train_round(steps=3)
    return t


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_deferred_global_is_served_only_from_the_next_round_on() -> None:
    deferring, immediate = _trained(True), _trained(False)
    assert _same(deferring.shared_state(), immediate.shared_state())  # same start: same data, seed, steps
    glob = _trained(False, seed=7).shared_state()  # another site's adapter stands in for the global
    served = deferring.shared_state()
    probe = ToyTask(toy_config(seed=1), seed=3).samples(20)
    answers = [deferring.predict(s)[1] for s in probe]

    deferring.apply_global(glob)
    immediate.apply_global(glob)
    assert deferring.pending_global and not immediate.pending_global
    assert _same(deferring.shared_state(), served)  # still the site-tuned adapter ...
    assert all(torch.equal(torch.as_tensor(deferring.predict(s)[1]), torch.as_tensor(a))
               for s, a in zip(probe, answers, strict=True))  # ... and the same answers
    assert _same(immediate.shared_state(), glob) and not _same(served, glob)

    deferring.train_round(steps=0)  # the next round starts from the global
    assert not deferring.pending_global
    assert _same(deferring.shared_state(), immediate.shared_state())
    lora = [p for n, p in deferring.model.named_parameters() if ".lora_" in n]
    assert lora and all(p not in deferring.optimizer.state for p in lora)  # their Adam moments were reset


def test_a_bad_global_is_refused_at_once_and_changes_nothing() -> None:
    t = _trained(True)
    served = t.shared_state()
    bad = {k: torch.full_like(v, math.nan) for k, v in served.items()}
    with pytest.raises(NonFiniteAdapterError):
        t.apply_global(bad)
    assert not t.pending_global and _same(t.shared_state(), served)
    t.train_round(steps=0)
    assert _same(t.shared_state(), served)


def test_the_edge_setting_builds_a_deferring_trainer(tmp_path: Path) -> None:
    cfg = toy_config(seed=1)
    base = {
        "site": "site-0", "edge_id": "edge-0", "broker": "mqtt://127.0.0.1:1", "state_dir": str(tmp_path),
        "model": {"modalities": {m: {"token_dim": s.token_dim, "max_tokens": s.max_tokens}
                                 for m, s in cfg.modalities.items()}, "num_classes": cfg.num_classes},
    }
    assert build_trainer(EdgeConfig.from_dict({**base, "training": {"defer_global": True}})).defer_global
    assert not build_trainer(EdgeConfig.from_dict(base)).defer_global  # off by default: nothing changes
