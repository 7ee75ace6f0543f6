"""``[training] adaptive_mix`` / ``Trainer(mix_grid=...)`` and the fleet's personal part under ``share_personal``:
installed, or deferred, together with the adapter; a round starts from the best fleet/own mix."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from edge_agent.checkpoints import build_trainer
from edge_agent.config import EdgeConfig, EdgeConfigError
from edge_agent.training.adaptive_mix import MIX_GRID, best_mix
from edge_agent.training.toy_task import ToyTask, toy_config
from edge_agent.training.trainer import Trainer
from megace_model.errors import AdapterMismatchError, NonFiniteAdapterError

State = dict[str, torch.Tensor]


def _trained(seed: int = 0, *, defer: bool = True, grid: tuple[float, ...] = ()) -> Trainer:
    torch.manual_seed(0)
    t = Trainer(toy_config(seed=1), device="cpu", lr=1e-2, defer_global=defer, mix_grid=grid)
    for s in ToyTask(toy_config(seed=1), seed=seed).samples(60):
        t.add_sample(s)
    t.train_round(steps=4)
    return t


def _same(a: State, b: State) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _close(a: State, b: State) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def _fleet() -> tuple[State, State]:
    other = _trained(seed=7, defer=False)  # another site's model stands in for the fleet's
    return other.shared_state(), other.personal_state()


def test_the_personal_part_is_deferred_with_the_adapter() -> None:
    lora, body = _fleet()
    t = _trained()
    served_lora, served_body = t.shared_state(), t.personal_state()
    assert not _same(served_body, body)
    t.apply_global(lora, personal=body)
    assert _same(t.shared_state(), served_lora) and _same(t.personal_state(), served_body)  # still the site's
    assert t.pending_personal is not None and _same(t.pending_personal, body)
    assert t.train_round(steps=0)["mix_weight"] is None
    assert _same(t.shared_state(), lora) and _same(t.personal_state(), body)  # the round starts from the fleet's
    assert t.pending_personal is None


def test_without_deferral_the_personal_part_is_installed_at_once() -> None:
    lora, body = _fleet()
    t = _trained(defer=False)
    t.apply_global(lora, personal=body)
    assert _same(t.shared_state(), lora) and _same(t.personal_state(), body)


def test_a_bad_personal_part_or_adapter_changes_nothing() -> None:
    lora, body = _fleet()
    for defer in (True, False):
        t = _trained(defer=defer)
        served_lora, served_body = t.shared_state(), t.personal_state()
        wrong_shape = {**body, next(iter(body)): torch.zeros(3)}
        with pytest.raises(AdapterMismatchError):
            t.apply_global(lora, personal=wrong_shape)
        with pytest.raises(NonFiniteAdapterError):  # the personal part is fine, the adapter is not
            t.apply_global({k: torch.full_like(v, math.nan) for k, v in lora.items()}, personal=body)
        assert _same(t.shared_state(), served_lora) and _same(t.personal_state(), served_body)
        assert not t.pending_global and t.pending_personal is None


def _held_accuracy(t: Trainer, lora: State, body: State) -> float:
    """Accuracy on the held-out window, by hand: load the state, count the argmax hits."""
    params = dict(t.model.named_parameters())
    base = dict(t.model.get_base_model().named_parameters())
    with torch.no_grad():
        for k, v in lora.items():  # peft's state-dict names leave out the adapter's name
            params[k.replace(".weight", ".default.weight")].copy_(v)
        for k, v in body.items():
            base[k].copy_(v)
    held = t.split()[1]
    return sum(int(t.predict(s.as_sample())[0] == s.label) for s in held) / len(held)


def test_a_round_starts_from_the_mix_that_does_best_on_held_out() -> None:
    lora, body = _fleet()
    t = _trained(grid=MIX_GRID)
    own_lora, own_body = t.shared_state(), t.personal_state()
    far = {k: 4.0 * v for k, v in body.items()}  # a fleet model far off, so that it cannot win outright

    def state(w: float) -> tuple[State, State]:
        return ({k: w * lora[k] + (1 - w) * own_lora[k] for k in own_lora},
                {k: w * far[k] + (1 - w) * own_body[k] for k in own_body})

    scores = {w: _held_accuracy(t, *state(w)) for w in MIX_GRID}
    best = max(MIX_GRID, key=lambda w: (scores[w], w))
    assert best < 1.0, scores
    t.load_state_dict({**t.state_dict(), "shared": own_lora, "personal": own_body})  # undo the hand evaluation
    t.apply_global(lora, personal=far)
    assert t.train_round(steps=0)["mix_weight"] == best
    want_lora, want_body = state(best)
    assert _close(t.shared_state(), want_lora) and _close(t.personal_state(), want_body)


def test_the_mix_of_a_fleet_equal_to_the_site_keeps_the_largest_weight() -> None:
    t = _trained(grid=(0.0, 0.5, 1.0))
    t.apply_global(t.shared_state(), personal=t.personal_state())
    assert t.train_round(steps=0)["mix_weight"] == 1.0
    assert t.train_round(steps=0)["mix_weight"] is None  # nothing new from the fleet: nothing mixed
    calls: list[float] = []
    assert best_mix((0.0, 0.5), calls.append, lambda: 0.25) == 0.5 and calls == [0.5, 0.0, 0.5]


def test_settings_are_checked_and_build_the_trainer(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="defer_global"):
        Trainer(toy_config(seed=1), device="cpu", mix_grid=(0.0, 1.0))
    for bad in ((0.0, 1.5), (-0.5, 1.0)):
        with pytest.raises(ValueError, match="mix_grid"):
            Trainer(toy_config(seed=1), device="cpu", defer_global=True, mix_grid=bad)
    cfg = toy_config(seed=1)
    base = {
        "site": "site-0", "edge_id": "edge-0", "broker": "mqtt://127.0.0.1:1", "state_dir": str(tmp_path),
        "model": {"modalities": {m: {"token_dim": s.token_dim, "max_tokens": s.max_tokens}
                                 for m, s in cfg.modalities.items()}, "num_classes": cfg.num_classes},
    }
    with pytest.raises(EdgeConfigError, match="adaptive_mix"):
        EdgeConfig.from_dict({**base, "training": {"adaptive_mix": True}})
    built = build_trainer(EdgeConfig.from_dict({**base, "training": {"defer_global": True, "adaptive_mix": True}}))
    assert built.mix_grid == MIX_GRID
    assert build_trainer(EdgeConfig.from_dict({**base, "training": {"defer_global": True}})).mix_grid == ()


def test_the_round_event_tells_dashboards_the_chosen_weight(tmp_path: Path) -> None:
    """docs/METRICS.md ``round``: ``mix_weight`` is the weight the round started from, null when none was chosen."""
    import json

    from broker.metrics import Counters
    from edge_agent.reporting import round_event
    from edge_agent.state import AgentState
    from tests.edge.test_edge_core import NOWHERE
    from tests.support.edge_testkit import edge_config

    config = edge_config(tmp_path, NOWHERE, {})
    state = AgentState()
    state.round = 3
    for chosen in (0.25, None):
        event = json.loads(round_event(config, state, {"loss": 0.5, "mix_weight": chosen}, None, Counters()))
        assert event["data"]["mix_weight"] == chosen
