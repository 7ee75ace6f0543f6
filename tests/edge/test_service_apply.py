"""Applying the cloud's adapters on a running agent: the served model really computes with the global's
tensors (checked against LoRA arithmetic done by hand), and an older global or view never replaces a
newer one, whatever order and timing the messages arrive in."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import numpy as np
import pytest
import torch

from broker import topics
from broker.wire import GlobalAdapter, Kind, Prediction, SiteFeedback, encode_envelope
from edge_agent.service import EdgeAgent
from edge_agent.training.toy_task import ToyTask
from megace_model.adapters import build_edge_model, shared_state
from megace_model.batch import collate
from tests.support.collector import Collector
from tests.support.edge_testkit import Device, edge_config, eventually, record, running, uid

torch.set_num_threads(1)

ENV_PROJ = "base_model.model.modality_proj.env"  # a LoRA-wrapped nn.Linear: token (8) -> hidden


def _capture(model: torch.nn.Module, module_name: str) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], Any]:
    """Record the input and output of one layer of ``model`` on every forward (any thread)."""
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    lock = threading.Lock()

    def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        with lock:
            calls.append((args[0].detach().clone(), out.detach().clone()))

    return calls, dict(model.named_modules())[module_name].register_forward_hook(hook)


def _expected_layer_output(layer: torch.nn.Module, x: torch.Tensor, a: np.ndarray, b: np.ndarray,
                           scale: float) -> torch.Tensor:
    """y = W x + bias + (alpha / r) * B A x: the frozen linear plus the LoRA update, spelled out."""
    base = layer.base_layer
    w, bias = base.weight.detach(), base.bias.detach()
    a_t, b_t = torch.from_numpy(a).float(), torch.from_numpy(b).float()
    return x @ w.T + bias + scale * ((x @ a_t.T) @ b_t.T)


async def test_the_served_model_computes_with_the_global_as_lora_arithmetic_says(mosquitto_addr, tmp_path) -> None:
    config = edge_config(tmp_path / "state", mosquitto_addr)
    task = ToyTask(config.model, seed=11)
    probe = task.sample(label=2, modalities=("env", "imu"))
    probe_inputs = collate([{"modalities": probe["modalities"]}], config.model, with_labels=False).model_inputs()
    async with running(config) as agent:
        dev = await Device(config.site, uid("dev"), mosquitto_addr, tmp_path).start()
        try:
            await eventually(lambda: dev.received(Kind.CONFIG), what="config")
            rng = np.random.default_rng(7)
            names = shared_state(agent.trainer.model)
            tensors = {k: rng.normal(scale=0.3, size=tuple(v.shape)).astype(np.float32) for k, v in names.items()}
            # the cloud merged at alpha 32 and rank 8: the update it means is (32 / 8) * B A, while this edge's
            # own LoRA scaling is 16 / 8, so the edge must install 2 * B to serve what the cloud computed
            glob = GlobalAdapter(version=1, base_model=agent.trainer.fingerprint, strategy="fedavg", rank=8,
                                 alpha=32.0, tensors=tensors, contributors=["e1"])
            calls, hook = _capture(agent.predictor.model, ENV_PROJ)
            try:
                with Collector(mosquitto_addr, "unused/#") as pub:
                    pub.client.publish(topics.global_down(), encode_envelope(Kind.GLOBAL, "cloud", 1, glob.to_body()),
                                       qos=1).wait_for_publish(5)
                await eventually(lambda: agent.state.global_version == 1 and agent.predictor.version == 1,
                                 what="global applied and served")
                await dev.infer(record(dev.id, 1, probe, label=False))
                pred = (await eventually(lambda: dev.received(Kind.PREDICTION), what="prediction"))[0]
            finally:
                hook.remove()
            assert isinstance(pred, Prediction) and pred.model_version == 1
            # 1. layer level: the served layer adds (alpha / r) * B A x to the frozen projection
            layer = dict(agent.predictor.model.named_modules())[ENV_PROJ]
            a, b = tensors[f"{ENV_PROJ}.lora_A.weight"], tensors[f"{ENV_PROJ}.lora_B.weight"]
            assert len(calls) == 1
            x, y = calls[0]
            assert torch.allclose(y, _expected_layer_output(layer, x, a, b, 32 / 8), atol=1e-5)
            assert not torch.allclose(y, _expected_layer_output(layer, x, a, b, 16 / 8), atol=1e-3)
            # the trainer's copy (the one the next round trains from) holds the same update
            calls, hook = _capture(agent.trainer.model, ENV_PROJ)
            try:
                await asyncio.to_thread(agent.trainer.predict, {"modalities": probe["modalities"]})
            finally:
                hook.remove()
            trainer_layer = dict(agent.trainer.model.named_modules())[ENV_PROJ]
            assert torch.allclose(calls[0][1], _expected_layer_output(trainer_layer, calls[0][0], a, b, 4.0),
                                  atol=1e-5)
            # 2. model level: the prediction the device got equals a model built here from the same seeded
            # base with the global's LoRA weights written straight into its parameters
            reference = build_edge_model(config.model).eval()
            params = dict(reference.named_parameters())
            with torch.no_grad():
                for name, value in tensors.items():
                    target = name.replace(".lora_A.weight", ".lora_A.default.weight").replace(
                        ".lora_B.weight", ".lora_B.default.weight")
                    factor = (32 / 8) / (16 / 8) if ".lora_B." in name else 1.0
                    params[target].copy_(torch.from_numpy(value) * factor)
                want = torch.softmax(reference(**probe_inputs).logits[0], dim=-1).numpy()
            assert np.allclose(pred.probs, want, atol=1e-5), (pred.probs, want)
            assert pred.label == int(want.argmax())
        finally:
            await dev.close()


def _global(agent: EdgeAgent, version: int, fill: float) -> bytes:
    tensors = {k: np.full(tuple(v.shape), fill, np.float32) for k, v in shared_state(agent.trainer.model).items()}
    glob = GlobalAdapter(version, agent.trainer.fingerprint, "fedavg", 8, 16.0, tensors)
    return encode_envelope(Kind.GLOBAL, "cloud", version, glob.to_body())


def _view(agent: EdgeAgent, version: int, fill: float) -> bytes:
    tensors = {k: np.full(tuple(v.shape), fill, np.float32) for k, v in shared_state(agent.trainer.model).items()}
    view = SiteFeedback(site=agent.site, version=version, rank=8, tensors=tensors, stats={})
    return encode_envelope(Kind.SITE_FEEDBACK, "cloud", version, view.to_body())


def _installed_fill(agent: EdgeAgent) -> set[float]:
    """The distinct values in the trainer's and the predictor's shared tensors (one per message sent)."""
    values = set()
    for model in (agent.trainer.model, agent.predictor.model):
        for tensor in shared_state(model).values():
            values.update(round(float(v), 6) for v in torch.unique(tensor))
    return values


def _processed(agent: EdgeAgent) -> int:
    """Every global or view ends as exactly one of: applied, or set aside as stale."""
    return agent.counters["globals_applied"] + agent.counters["global_stale"]


async def test_an_older_global_or_view_never_replaces_a_newer_one_whatever_the_arrival_order(
    mosquitto_addr, tmp_path
) -> None:
    """Random interleavings of globals and site views, handed to the agent back to back (so several
    wait to be applied at once) or one at a time. Independently of order and timing, what is installed
    at the end is the newest version, and of that version the site's view if one came (it is cut to
    this edge), else the global; among equals, the first to arrive."""
    config = edge_config(tmp_path / "state", mosquitto_addr)
    rng = np.random.default_rng(2024)
    global_topic, view_topic = topics.global_down(), topics.site_feedback(config.site)
    async with running(config) as agent:
        sent = 0
        for trial in range(6):
            messages = []
            for i in range(6):
                version = 10 * (trial + 1) + int(rng.integers(1, 4))
                source = "view" if rng.random() < 0.4 else "global"
                messages.append((source, version, round(0.001 * (100 * trial + i + 1), 6)))
            newest = max(v for _, v, _ in messages)
            latest = [m for m in messages if m[1] == newest]
            winner = next((m for m in latest if m[0] == "view"), latest[0])
            versions_seen = []
            for source, version, fill in messages:
                payload = _view(agent, version, fill) if source == "view" else _global(agent, version, fill)
                agent.handle(view_topic if source == "view" else global_topic, payload)
                sent += 1
                if rng.random() < 0.4:  # sometimes let it apply before the next one arrives
                    await eventually(lambda n=sent: _processed(agent) == n, what="message processed")
                    versions_seen.append(agent.state.global_version)
            await eventually(lambda n=sent: _processed(agent) == n, what="all messages processed")
            assert (agent.state.global_version, agent.state.global_source) == (newest, winner[0]), (messages, trial)
            assert _installed_fill(agent) == {winner[2]}, (messages, winner)
            assert agent.predictor.version == newest
            assert versions_seen == sorted(versions_seen), "the installed version went backwards"
        assert agent.counters["rejected"] == 0


@pytest.mark.parametrize("older", ["global", "view"])
async def test_over_the_broker_an_older_message_after_a_newer_global_changes_nothing(
    mosquitto_addr, tmp_path, older: str
) -> None:
    config = edge_config(tmp_path / "state", mosquitto_addr)
    task = ToyTask(config.model, seed=12)
    probe = task.sample(label=0, modalities=("env",))
    async with running(config) as agent:
        dev = await Device(config.site, uid("dev"), mosquitto_addr, tmp_path).start()
        try:
            await eventually(lambda: dev.received(Kind.CONFIG), what="config")
            with Collector(mosquitto_addr, "unused/#") as pub:
                pub.client.publish(topics.global_down(), _global(agent, 5, 0.02), qos=1).wait_for_publish(5)
                await eventually(lambda: agent.predictor.version == 5, what="global v5 served")
                await dev.infer(record(dev.id, 1, probe, label=False))
                first = (await eventually(lambda: dev.received(Kind.PREDICTION), what="prediction"))[0]
                stale = _global(agent, 4, 0.5) if older == "global" else _view(agent, 4, 0.5)
                topic = topics.global_down() if older == "global" else topics.site_feedback(config.site)
                pub.client.publish(topic, stale, qos=1).wait_for_publish(5)
                await eventually(lambda: agent.counters["global_stale"] == 1, what="older message set aside")
            assert agent.state.global_version == 5 and _installed_fill(agent) == {0.02}
            await dev.infer(record(dev.id, 2, probe, label=False))
            preds = await eventually(lambda: len(dev.received(Kind.PREDICTION)) >= 2 and dev.received(Kind.PREDICTION))
            assert preds[1].model_version == 5 and np.array_equal(preds[1].probs, first.probs)
            assert not [f for f in dev.received(Kind.FEEDBACK) if f.global_version == 4], "stale feedback relayed"
        finally:
            await dev.close()
