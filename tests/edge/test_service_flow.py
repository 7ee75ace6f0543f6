"""End to end on a real Mosquitto: devices register and publish, the agent trains and uploads,
serves predictions, and applies the cloud's global adapter (also after a restart, from the retained copy)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
from peft import PeftModel

from broker import topics
from broker.wire import AdapterUpdate, DeviceConfig, GlobalAdapter, Kind, Prediction, decode_metrics, encode_envelope
from broker.wire.bodies import decode_body
from edge_agent.training.toy_task import ToyTask
from megace_model.adapters import build_base_model, shared_state
from tests.support.collector import Collector
from tests.support.edge_testkit import Device, edge_config, eventually, record, running, uid

torch.set_num_threads(1)


async def test_devices_register_publish_and_the_agent_trains_and_uploads(mosquitto_addr, tmp_path) -> None:
    config = edge_config(tmp_path / "state", mosquitto_addr,
                         {"training": {"min_new_samples": 200, "steps": 40, "batch_size": 32}})
    task = ToyTask(config.model, seed=3)
    test_set = task.samples(200)
    with Collector(mosquitto_addr, *topics.subscriptions(topics.adapter_up(config.site)),
                   topics.metrics(topics.Role.EDGE, config.edge_id, config.site)) as cloud:
        async with running(config) as agent:
            before = agent.trainer.evaluate(test_set)["acc"]
            devices: list[Device] = []
            try:
                for _ in range(2):
                    devices.append(await Device(config.site, uid("dev"), mosquitto_addr, tmp_path).start())
                for dev in devices:
                    await eventually(lambda dev=dev: dev.received(Kind.CONFIG), what="device config")
                    cfg = dev.received(Kind.CONFIG)[0]
                    assert isinstance(cfg, DeviceConfig)
                    assert cfg.modalities == ["env", "imu"] and cfg.shapes == {"env": (8,), "imu": (4, 6)}
                for dev in devices:
                    await dev.publish([record(dev.id, i, s) for i, s in enumerate(task.samples(100))])
                await eventually(lambda: agent.state.round >= 1 and agent.metrics()["uploads"] >= 1, 60,
                                 "round + upload")
                after = agent.trainer.evaluate(test_set)["acc"]
                fingerprint = agent.trainer.fingerprint
                expected_names = set(agent.trainer.shared_state())
                export_dir = tmp_path / "state" / "adapter"
                assert (export_dir / "adapter_config.json").exists()
            finally:
                for dev in devices:
                    await dev.close()
        uploads = [(t, e) for t, e in cloud.wait_for(1) if t == topics.adapter_up(config.site)]
        metrics_topic = topics.metrics(topics.Role.EDGE, config.edge_id, config.site)
        metrics = [json.loads(p) for t, p, _ in cloud.raw if t == metrics_topic]
    # training is real: the toy task is learnt
    assert after > before + 0.25 and after > 0.6, (before, after)
    # the upload decodes as an AdapterUpdate with the promised metadata
    assert uploads, "no adapter upload on the cloud topic"
    update = decode_body(uploads[0][1])
    assert isinstance(update, AdapterUpdate)
    assert (update.edge, update.site, update.seq, update.rank) == (config.edge_id, config.site, 1, 8)
    assert update.base_model == fingerprint and update.base_version == 0
    assert set(update.tensors) == expected_names and all(".modality_proj." in k or ".encoder." in k
                                                          for k in update.tensors)
    assert not any(k.startswith(("base_model.model.head", "base_model.model.cross")) for k in update.tensors)
    assert update.samples == 160 and set(update.modalities) == {"env", "imu"}  # 200 records, every 5th held out
    assert 0 <= update.metrics["train_acc"] <= 1 and update.metrics["steps"] == 40
    # metrics JSON carries what the dashboard reads
    last = decode_metrics(json.dumps(metrics[-1]).encode())["metrics"]
    for key in ("round", "global_version", "samples_total", "train_loss", "train_acc", "heldout_acc", "bytes_up",
                "bytes_down", "uploads", "predictions", "rejected", "ingest_rate", "rank", "modalities"):
        assert key in last, key
    assert last["samples_total"] == 200 and last["round"] >= 1 and last["uploads"] >= 1
    # the export is a normal peft adapter
    peft_model = PeftModel.from_pretrained(build_base_model(config.model), str(export_dir))
    exported = shared_state(peft_model)
    assert set(exported) == expected_names
    assert all(torch.equal(exported[k], torch.from_numpy(np.array(update.tensors[k]))) for k in exported)


@pytest.fixture
def publish_retained_global(mosquitto_addr) -> Iterator[Callable[[bytes], None]]:
    """Publish a global retained, as the cloud does; the retained copy is cleared in teardown even when
    the test fails (the session broker is shared, and every later edge would otherwise apply it)."""
    published: list[bytes] = []

    def publish(payload: bytes) -> None:
        published.append(payload)
        with Collector(mosquitto_addr, "unused/#") as pub:
            pub.client.publish(topics.global_down(), payload, qos=1, retain=True).wait_for_publish(5)

    try:
        yield publish
    finally:
        if published:
            with Collector(mosquitto_addr, "unused/#") as pub:
                pub.client.publish(topics.global_down(), b"", qos=1, retain=True).wait_for_publish(5)


async def test_prediction_and_global_adapter_applied_live_and_after_restart(
    mosquitto_addr, tmp_path, publish_retained_global
) -> None:
    config = edge_config(tmp_path / "state", mosquitto_addr)
    task = ToyTask(config.model, seed=5)
    probe = task.sample(label=1)
    async with running(config) as agent:
        dev = await Device(config.site, uid("dev"), mosquitto_addr, tmp_path).start()
        try:
            await eventually(lambda: dev.received(Kind.CONFIG), what="config")
            await dev.infer(record(dev.id, 7, probe, label=False))
            pred = (await eventually(lambda: dev.received(Kind.PREDICTION), what="prediction"))[0]
            assert isinstance(pred, Prediction) and pred.sample == 7 and pred.device == dev.id
            assert pred.probs.shape == (4,) and abs(float(pred.probs.sum()) - 1) < 1e-5
            assert pred.label == pred.probs.argmax()
            # a global adapter far from the current one, published retained like the cloud does
            current = agent.trainer.shared_state()
            rng = np.random.default_rng(0)
            tensors = {k: (rng.normal(scale=0.5, size=tuple(v.shape))).astype(np.float32) for k, v in current.items()}
            glob = GlobalAdapter(version=3, base_model=agent.trainer.fingerprint, strategy="fedavg", rank=8, alpha=16.0,
                                 tensors=tensors, contributors=["x"])
            publish_retained_global(encode_envelope(Kind.GLOBAL, "cloud", 3, glob.to_body()))
            await eventually(lambda: agent.state.global_version == 3, what="global applied")
            applied = agent.trainer.shared_state()
            assert all(np.allclose(applied[k].numpy(), tensors[k]) for k in tensors)
            await eventually(lambda: dev.received(Kind.FEEDBACK), what="feedback relayed")
            assert dev.received(Kind.FEEDBACK)[-1].global_version == 3
            await dev.infer(record(dev.id, 8, probe, label=False))
            preds = await eventually(lambda: len(dev.received(Kind.PREDICTION)) >= 2 and dev.received(Kind.PREDICTION))
            assert preds[1].model_version == 3
            assert not np.allclose(preds[1].probs, pred.probs, atol=1e-4), "outputs did not change with the global"
        finally:
            await dev.close()
    # a restarted agent (fresh state dir) picks up the retained global at once
    again = edge_config(tmp_path / "state2", mosquitto_addr, {"site": config.site, "edge_id": uid("edge")})
    async with running(again) as agent2:
        await eventually(lambda: agent2.state.global_version == 3, timeout=10, what="retained global")
        restored = agent2.trainer.shared_state()
        assert all(np.allclose(restored[k].numpy(), tensors[k]) for k in tensors)


async def test_site_feedback_view_for_this_rank_is_applied_and_relayed(mosquitto_addr, tmp_path) -> None:
    from broker.wire import DeviceFeedback, SiteFeedback

    config = edge_config(tmp_path / "state", mosquitto_addr, {"model": {"lora_r": 4, "lora_alpha": 8}})
    async with running(config) as agent:
        dev = await Device(config.site, uid("dev"), mosquitto_addr, tmp_path).start()
        try:
            await eventually(lambda: dev.received(Kind.CONFIG), what="config")
            shapes = {k: tuple(v.shape) for k, v in agent.trainer.shared_state().items()}
            wide = {k: np.zeros((8, s[1]) if ".lora_A." in k else (s[0], 8), np.float32) for k, s in shapes.items()}
            view = {k: np.full(s, 0.02, np.float32) for k, s in shapes.items()}
            glob = GlobalAdapter(4, agent.trainer.fingerprint, "hetlora", 8, 16.0, wide)
            feedback = SiteFeedback(site=config.site, version=4, rank=4, tensors=view, stats={"global_acc": 0.7},
                                    accepted=[1])
            with Collector(mosquitto_addr, "unused/#") as pub:
                pub.client.publish(topics.global_down(), encode_envelope(Kind.GLOBAL, "c", 4, glob.to_body()),
                                   qos=1).wait_for_publish(5)
                await eventually(lambda: agent.counters["global_other_rank"] == 1, what="rank-8 global set aside")
                assert agent.state.global_version == -1
                pub.client.publish(topics.site_feedback(config.site),
                                   encode_envelope(Kind.SITE_FEEDBACK, "c", 5, feedback.to_body()),
                                   qos=1).wait_for_publish(5)
            await eventually(lambda: agent.state.global_version == 4, what="view applied")
            assert agent.state.global_source == "view"
            assert all(np.allclose(v.numpy(), 0.02) for v in agent.trainer.shared_state().values())
            relayed = await eventually(lambda: [f for f in dev.received(Kind.FEEDBACK) if f.global_version == 4])
            assert isinstance(relayed[0], DeviceFeedback) and relayed[0].metrics == {"global_acc": 0.7}
        finally:
            await dev.close()


async def test_a_device_gets_its_prediction_while_a_training_round_is_in_progress(mosquitto_addr, tmp_path) -> None:
    """The training thread is held inside an optimisation step (the trainer's model locked) until the
    device has its prediction: the agent serves from its own copy, so the answer comes anyway."""
    config = edge_config(tmp_path / "state", mosquitto_addr,
                         {"training": {"min_new_samples": 20, "steps": 3, "batch_size": 8}})
    task = ToyTask(config.model, seed=21)
    in_step, release = threading.Event(), threading.Event()

    def hold_step(*_: object) -> None:
        if not in_step.is_set():
            in_step.set()
            release.wait(60)

    async with running(config) as agent:
        hook = agent.trainer.optimizer.register_step_pre_hook(hold_step)
        dev = await Device(config.site, uid("dev"), mosquitto_addr, tmp_path).start()
        try:
            await eventually(lambda: dev.received(Kind.CONFIG), what="config")
            await dev.publish([record(dev.id, i, s) for i, s in enumerate(task.samples(20))])
            await eventually(in_step.is_set, what="a training step in progress")
            await dev.infer(record(dev.id, 99, task.sample(), label=False))
            pred = (await eventually(lambda: dev.received(Kind.PREDICTION), what="prediction during the round"))[0]
            assert pred.sample == 99 and abs(float(pred.probs.sum()) - 1) < 1e-5
            assert agent.trainer.steps == 0 and agent.state.round == 0, "the round was not in progress"
            release.set()
            await eventually(lambda: agent.state.round == 1, what="the round finishes once released")
            assert agent.trainer.steps == 3
        finally:
            release.set()
            hook.remove()
            await dev.close()
