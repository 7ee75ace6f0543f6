"""Config loading, corrupt checkpoints, broker restarts and the two baselines (local-only, shared personal part)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from broker import topics
from broker.address import BrokerAddress
from broker.wire import AdapterUpdate, GlobalAdapter, Kind, encode_envelope
from broker.wire.bodies import decode_body
from edge_agent.config import EdgeConfigError, load_edge_config
from edge_agent.state import AgentState, StateStore
from edge_agent.training.toy_task import ToyTask
from edge_agent.training.trainer import Trainer
from tests.support.collector import Collector
from tests.support.edge_testkit import Device, edge_config, eventually, record, running, uid

torch.set_num_threads(1)


def test_config_file_env_and_overrides_layer_and_round_trip(tmp_path) -> None:
    path = tmp_path / "edge.toml"
    path.write_text(
        'site = "s1"\nedge_id = "e1"\nbroker = "mqtt://10.0.0.2:1884"\n'
        '[model]\nmodalities = { audio = { token_dim = 16, max_tokens = 8 }, imu = { token_dim = 6 } }\n'
        'num_classes = 5\nlora_r = 4\n[training]\nepochs = 2\nupload_fp16 = true\n[limits]\ninfer_queue = 7\n'
    )
    env = {"MEGACE_EDGE__TRAINING__LR": "0.01", "MEGACE_EDGE__EDGE_ID": "e2", "MEGACE_EDGE__MODEL__LORA_ALPHA": "8",
           "OTHER": "x"}
    cfg = load_edge_config(path, {"limits": {"infer_batch": 3}}, environ=env)
    assert (cfg.site, cfg.edge_id, cfg.address.port) == ("s1", "e2", 1884)
    assert cfg.model.modality_names == ("audio", "imu") and cfg.model.modalities["audio"].max_tokens == 8
    assert (cfg.model.num_classes, cfg.model.lora_r, cfg.model.lora_alpha) == (5, 4, 8)
    assert cfg.training.epochs == 2 and cfg.training.steps is None and cfg.training.lr == 0.01
    assert cfg.training.upload_fp16 and (cfg.limits.infer_queue, cfg.limits.infer_batch) == (7, 3)
    again = load_edge_config(cfg.write(tmp_path / "out.toml"), environ={})
    assert again == cfg
    example = load_edge_config(Path(__file__).resolve().parents[2] / "deploy" / "edge.example.toml", environ={})
    assert example.state_dir == "/var/lib/megace/edge" and example.training.steps == 20
    with pytest.raises(EdgeConfigError, match="unknown key"):
        load_edge_config(None, {"training": {"learning_rate": 1}}, environ={})
    with pytest.raises(EdgeConfigError):
        load_edge_config(None, {"site": "bad/site"}, environ={})
    with pytest.raises(EdgeConfigError):
        load_edge_config(None, {"model": {"backbone": "gpt"}}, environ={})


async def test_corrupt_checkpoint_falls_back_or_starts_fresh_and_never_reuses_a_seq(mosquitto_addr, tmp_path) -> None:
    config = edge_config(tmp_path / "state", mosquitto_addr)
    store = StateStore(config.state_dir)
    trainer = Trainer(config.model, device="cpu")
    for sample in ToyTask(config.model).samples(30):
        trainer.add_sample(sample)
    trainer.train_round(steps=2, batch_size=8)
    store.save(trainer=trainer, state=AgentState(round=1, upload_seq=5), registry={}, outbox=[],
                       samples=trainer.buffer.snapshot())
    trainer.train_round(steps=2, batch_size=8)
    newest = store.save(trainer=trainer, state=AgentState(round=2, upload_seq=6), registry={}, outbox=[],
                        samples=trainer.buffer.snapshot())
    tensor_file = newest / "trainer" / "checkpoint.safetensors"
    tensor_file.write_bytes(tensor_file.read_bytes()[:-100])  # truncated by a crash or bit rot
    started = time.time_ns() // 1_000_000
    async with running(config) as agent:
        assert agent.counters["checkpoint_corrupt"] == 1
        assert agent.state.round == 1 and agent.trainer.rounds == 1 and len(agent.trainer.buffer) == 30
        assert agent.state.upload_seq >= started, "seqs after the corrupt generation could be reused"
    # everything unreadable: start fresh (counted), still no crash
    (store.root / "CURRENT").write_text("gen-99999999")
    gens = store.candidates()
    assert len(gens) == 2  # the shutdown checkpoint and the one before it
    for gen in gens:
        (gen / "agent.json").write_text("{not json")
    async with running(config) as agent:
        assert agent.counters["checkpoint_corrupt"] >= 1
        assert agent.state.round == 0 and len(agent.trainer.buffer) == 0
        assert agent.state.upload_seq >= started


async def test_agent_reconnects_after_a_broker_restart(fresh_mosquitto, tmp_path) -> None:
    addr = BrokerAddress(fresh_mosquitto.host, fresh_mosquitto.port)
    config = edge_config(tmp_path / "state", addr)
    task = ToyTask(config.model, seed=6)
    async with running(config) as agent:
        dev = await Device(config.site, uid("dev"), addr, tmp_path).start()
        await dev.publish([record(dev.id, i, s) for i, s in enumerate(task.samples(5))])
        await eventually(lambda: agent.counters["samples_total"] == 5, what="first records")
        fresh_mosquitto.stop()
        await eventually(lambda: not agent.connected.is_set(), 10, "agent notices the broker is gone")
        fresh_mosquitto.start()
        await eventually(lambda: agent.connected.is_set(), 30, "agent reconnected")
        await dev.publish([record(dev.id, 5 + i, s) for i, s in enumerate(task.samples(5))])
        await eventually(lambda: agent.counters["samples_total"] == 10, 20, "records after the restart")
        # Each of the first 5 records can come back twice, and both copies are recognised as duplicates (at least
        # once, applied once): the broker redelivers one whose PUBACK it had not read when it stopped to the edge's
        # persistent session, and the device re-sends one whose receipt had not reached it.  The 5 new ones never are.
        assert agent.counters["connects"] >= 2 and agent.counters["duplicates"] <= 2 * 5
        assert len(agent.trainer.buffer) == 10
        await dev.close()


async def test_local_only_never_uploads_and_share_personal_uploads_and_replaces_the_head(
    mosquitto_addr, tmp_path
) -> None:
    task = ToyTask(edge_config(tmp_path / "x", mosquitto_addr).model, seed=8)
    samples = task.samples(40)
    # local-only: trains, never uploads, ignores globals
    local = edge_config(tmp_path / "local", mosquitto_addr, {"training": {"local_only": True}})
    with Collector(mosquitto_addr, *topics.subscriptions(topics.adapter_up(local.site))) as cloud:
        async with running(local) as agent:
            dev = await Device(local.site, uid("dev"), mosquitto_addr, tmp_path).start()
            await dev.publish([record(dev.id, i, s) for i, s in enumerate(samples)])
            await eventually(lambda: agent.state.round == 1, 30, "local round")
            glob = GlobalAdapter(1, agent.trainer.fingerprint, "fedavg", 8, 16.0,
                                 {k: v.numpy() * 0 for k, v in agent.trainer.shared_state().items()})
            cloud.client.publish(topics.global_down(), encode_envelope(Kind.GLOBAL, "c", 1, glob.to_body()),
                                 qos=1).wait_for_publish(5)
            await eventually(lambda: agent.counters["global_ignored"] == 1, what="global ignored")
            assert agent.state.upload_seq == 0 and not agent.outbox and agent.state.global_version == -1
            await dev.close()
        assert not cloud.envelopes, "local-only agent uploaded"
    # share_personal: personal tensors travel and are replaced by the global's
    shared = edge_config(tmp_path / "shared", mosquitto_addr, {"training": {"share_personal": True}})
    with Collector(mosquitto_addr, *topics.subscriptions(topics.adapter_up(shared.site))) as cloud:
        async with running(shared) as agent:
            dev = await Device(shared.site, uid("dev"), mosquitto_addr, tmp_path).start()
            await dev.publish([record(dev.id, i, s) for i, s in enumerate(samples)])
            envs = await eventually(lambda: cloud.envelopes, 30, "upload")
            update = decode_body(envs[0][1])
            assert isinstance(update, AdapterUpdate)
            personal = {k for k in update.tensors if not (".lora_A." in k or ".lora_B." in k)}
            assert personal and all(k.startswith("base_model.model.") for k in personal)
            assert any(k.startswith("base_model.model.head") for k in personal)
            tensors = {k: np.full(v.shape, 0.01, np.float32) for k, v in update.tensors.items()}
            glob = GlobalAdapter(2, update.base_model, "fedavg", 8, 16.0, tensors)
            cloud.client.publish(topics.global_down(), encode_envelope(Kind.GLOBAL, "c", 2, glob.to_body()),
                                 qos=1).wait_for_publish(5)
            await eventually(lambda: agent.state.global_version == 2, what="global applied")
            head = {k: v for k, v in agent.trainer.personal_state().items() if k.startswith("head")}
            assert head and all(torch.allclose(v, torch.full_like(v, 0.01)) for v in head.values())
            await dev.close()
