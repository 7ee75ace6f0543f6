"""Bad input gets a counted, logged rejection (and an ErrorReport on the device's downlink), never a crash
and never a poisoned model."""

from __future__ import annotations

import numpy as np
import torch

from broker import topics
from broker.wire import (
    CapabilityProfile,
    ErrorReport,
    FeatureRecord,
    GlobalAdapter,
    Kind,
    ModalityProfile,
    Prediction,
    encode_envelope,
)
from edge_agent.training.toy_task import ToyTask
from tests.support.collector import Collector
from tests.support.edge_testkit import Device, edge_config, eventually, record, running, uid

torch.set_num_threads(1)


def _errors(dev: Device) -> list[ErrorReport]:
    return dev.received(Kind.ERROR)


async def test_bad_device_input_is_rejected_reported_and_the_agent_keeps_serving(mosquitto_addr, tmp_path) -> None:
    config = edge_config(tmp_path / "state", mosquitto_addr)
    task = ToyTask(config.model, seed=2)
    good = task.sample(label=0, modalities=("env", "imu"))
    async with running(config) as agent:
        stranger = await Device(config.site, uid("stranger"), mosquitto_addr, tmp_path).start(register=False)
        dev = await Device(config.site, uid("dev"), mosquitto_addr, tmp_path).start()
        await eventually(lambda: dev.received(Kind.CONFIG), what="config")

        # 1. a device that never registered
        await stranger.publish([record(stranger.id, 0, good)])
        err = (await eventually(lambda: _errors(stranger), what="error for unregistered"))[0]
        assert err.code == "unregistered" and err.ref is not None

        # 2. modality not in the profile, 3. wrong shape, 4. NaN, 5. Inf, 6. label out of range
        bad = [
            FeatureRecord(dev.id, 1, {"audio": np.zeros(8, np.float32)}, label=0),
            FeatureRecord(dev.id, 2, {"env": np.zeros(5, np.float32)}, label=0),
            FeatureRecord(dev.id, 3, {"env": np.array([np.nan] * 8, np.float32)}, label=0),
            FeatureRecord(dev.id, 4, {"imu": np.full((2, 6), np.inf, np.float32)}, label=1),
            FeatureRecord(dev.id, 5, {"env": np.zeros(8, np.float32)}, label=9),
        ]
        await dev.publish(bad)
        errs = await eventually(lambda: len(_errors(dev)) >= 5 and _errors(dev), what="five error reports")
        assert [e.code for e in errs] == ["profile_mismatch", "profile_mismatch", "non_finite", "non_finite",
                                          "bad_label"]
        # 7. bytes that are not an envelope, on the device's feature topic
        with Collector(mosquitto_addr, "unused/#") as raw:
            topic = topics.device_up(config.site, dev.id, topics.Uplink.FEATURES)
            raw.client.publish(topic, b"\x93not msgpack", qos=1).wait_for_publish(5)
        await eventually(lambda: len(_errors(dev)) >= 6, what="error for garbage")
        assert _errors(dev)[5].code == "malformed"
        # 8. a registration the model cannot use
        odd_id = uid("odd")
        odd = await Device(config.site, odd_id, mosquitto_addr, tmp_path).start(
            CapabilityProfile(device=odd_id, modalities={"audio": ModalityProfile(shape=(16,))}))
        assert (await eventually(lambda: _errors(odd), what="registration error"))[0].code == "registration"

        snap = agent.counters.snapshot()
        assert snap["rejected.UnregisteredDeviceError"] == 1
        assert snap["rejected.ProfileMismatchError"] == 2
        assert snap["rejected.NonFiniteFeaturesError"] == 2
        assert snap["rejected.BadLabelError"] == 1
        assert snap["rejected.DecodeError"] == 1
        assert snap["rejected.RegistrationError"] == 1
        assert agent.metrics()["rejected"] == 8
        assert len(agent.trainer.buffer) == 0, "a rejected record reached the replay buffer"

        # the agent still works: a good record is buffered and an inference is answered
        await dev.publish([record(dev.id, 10, good)])
        await eventually(lambda: len(agent.trainer.buffer) == 1, what="good record buffered")
        await dev.infer(record(dev.id, 11, good, label=False))
        pred = (await eventually(lambda: dev.received(Kind.PREDICTION), what="prediction"))[0]
        assert isinstance(pred, Prediction) and pred.sample == 11
        for d in (stranger, dev, odd):
            await d.close()


async def test_bad_global_adapters_are_rejected_and_leave_the_model_unchanged(mosquitto_addr, tmp_path) -> None:
    config = edge_config(tmp_path / "state", mosquitto_addr)
    async with running(config) as agent:
        before = agent.trainer.shared_state()
        fingerprint = agent.trainer.fingerprint
        good = {k: np.zeros(tuple(v.shape), np.float32) for k, v in before.items()}
        name = next(k for k in good if k.endswith("lora_A.weight"))
        wrong_shape = {**good, name: np.zeros((8, 3), np.float32)}
        with_nan = {**good, name: np.full(good[name].shape, np.nan, np.float32)}
        unknown = {**good, "base_model.model.nowhere.lora_A.weight": np.zeros((8, 8), np.float32)}
        cases = [
            (GlobalAdapter(1, fingerprint, "fedavg", 8, 16.0, wrong_shape), "rejected.AdapterMismatchError"),
            (GlobalAdapter(2, fingerprint, "fedavg", 8, 16.0, with_nan), "rejected.NonFiniteAdapterError"),
            (GlobalAdapter(3, fingerprint, "fedavg", 8, 16.0, unknown), "rejected.AdapterMismatchError"),
            (GlobalAdapter(4, "0" * 64, "fedavg", 8, 16.0, good), "rejected.BaseMismatchError"),
        ]
        with Collector(mosquitto_addr, "unused/#") as pub:
            for i, (glob, _) in enumerate(cases):
                payload = encode_envelope(Kind.GLOBAL, "cloud", i, glob.to_body())
                pub.client.publish(topics.global_down(), payload, qos=1).wait_for_publish(5)
            pub.client.publish(topics.global_down(), b"\x00garbage", qos=1).wait_for_publish(5)
        await eventually(lambda: agent.counters["rejected"] >= 5, what="five rejections")
        snap = agent.counters.snapshot()
        assert snap["rejected.AdapterMismatchError"] == 2
        assert snap["rejected.NonFiniteAdapterError"] == 1
        assert snap["rejected.BaseMismatchError"] == 1
        assert snap["rejected.DecodeError"] == 1
        assert agent.state.global_version == -1
        after = agent.trainer.shared_state()
        assert all(torch.equal(before[k], after[k]) for k in before), "a rejected global changed the model"
        # and a good one is still accepted afterwards
        with Collector(mosquitto_addr, "unused/#") as pub:
            glob = GlobalAdapter(5, fingerprint, "fedavg", 8, 16.0, good)
            pub.client.publish(topics.global_down(), encode_envelope(Kind.GLOBAL, "cloud", 5, glob.to_body()),
                               qos=1).wait_for_publish(5)
        await eventually(lambda: agent.state.global_version == 5, what="good global applied")
        assert all(float(t.abs().sum()) == 0 for t in agent.trainer.shared_state().values())
