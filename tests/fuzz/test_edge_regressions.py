"""Edge regressions: each input here once got past the edge's checks or crashed its handler.

Real EdgeCore (tiny model), real msgpack bytes; expectations are stated independently of the code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from broker import topics
from broker.address import BrokerAddress
from broker.wire import CapabilityProfile, ErrorReport, GlobalAdapter, Kind, ModalityProfile, decode_envelope
from broker.wire import encode_envelope as enc
from edge_agent.checkpoints import build_trainer
from edge_agent.core import EdgeCore
from edge_agent.errors import NonFiniteFeaturesError, RegistrationError
from edge_agent.registry import DeviceRegistry, RegistrationLimitError
from edge_agent.training.toy_task import ToyTask, toy_config
from megace_model.adapters import shared_state
from tests.support.edge_testkit import edge_config, record, toy_profile

torch.set_num_threads(1)
NOWHERE = BrokerAddress("127.0.0.1", 1)
CONFIG = toy_config()  # imu: up to 4 tokens of width 6; env: one token of width 8


@pytest.fixture
def core(tmp_path: Path) -> EdgeCore:
    config = edge_config(tmp_path / "state", NOWHERE, {"limits": {"max_devices": 3, "device_idle_evict_s": 60.0}})
    return EdgeCore(config, trainer=build_trainer(config))


def up(core: EdgeCore, device: str, what: topics.Uplink) -> str:
    return topics.device_up(core.site, device, what)


def register(core: EdgeCore, profile: CapabilityProfile, seq: int = 1):  # type: ignore[no-untyped-def]
    return core.ingest(up(core, profile.device, topics.Uplink.REGISTER),
                       enc(Kind.REGISTER, profile.device, seq, profile.to_body()))


def error_of(fx) -> str:  # type: ignore[no-untyped-def]
    (msg,) = fx.out
    assert msg.topic.endswith("/down/error")
    return ErrorReport.from_body(decode_envelope(msg.payload).body).message


def state(core: EdgeCore) -> tuple:  # type: ignore[type-arg]
    assert core.trainer is not None
    reg = core.registry
    return ({d: (e.accepted, e.last_seen, e.last_data) for d, e in reg.devices.items()},
            {s: dict(g.last) for s, g in reg.guards.items()}, len(core.trainer.buffer), core.new_samples)


def test_a_float64_record_beyond_float32_range_is_refused_before_it_trains_as_infinity(core: EdgeCore) -> None:
    register(core, toy_profile("d1"))
    sample = ToyTask(core.config.model, seed=1).samples(1)[0]
    env = sample["modalities"]["env"].astype(np.float64)
    env[0] = 1e300  # finite as float64, inf as float32
    bad = record("d1", 0, {**sample, "modalities": {**sample["modalities"], "env": env}})
    before = state(core)
    fx = core.ingest(up(core, "d1", topics.Uplink.FEATURES), enc(Kind.FEATURES, "d1", 5, bad.to_body()))
    assert error_of(fx).startswith("NonFiniteFeaturesError: modality 'env' holds values beyond float32's range")
    assert core.counters["rejected.NonFiniteFeaturesError"] == 1 and state(core) == before
    env[0] = 3.0e38  # within float32's range: accepted, and the same seq is still free (the guard did not move)
    good = record("d1", 0, {**sample, "modalities": {**sample["modalities"], "env": env}})
    fx = core.ingest(up(core, "d1", topics.Uplink.FEATURES), enc(Kind.FEATURES, "d1", 5, good.to_body()))
    assert fx.out == [] and core.counters["samples_total"] == 1 and core.registry.guards["features"].last["d1"] == 5


def test_registry_check_rejects_float32_overflow_for_inference_too() -> None:
    reg = DeviceRegistry(CONFIG)
    reg.register("d", CapabilityProfile("d", {"env": ModalityProfile((8,))}))
    from broker.wire import FeatureRecord

    for value in (3.5e38, -1e300):
        env = np.full(8, value, np.float64)
        with pytest.raises(NonFiniteFeaturesError):
            reg.check("d", FeatureRecord("d", 0, {"env": env}), need_label=False)
    assert reg.devices["d"].last_data == 0.0  # a refused record is not data


def test_a_registration_announcing_a_million_tokens_is_refused_and_changes_nothing(core: EdgeCore) -> None:
    register(core, toy_profile("d1"))
    before = state(core)
    huge = CapabilityProfile("d2", {"imu": ModalityProfile((10**6, 6)), "env": ModalityProfile((8,))})
    assert error_of(register(core, huge)).startswith(
        "RegistrationLimitError: modality 'imu': shape (1000000, 6) exceeds this edge's bound of 16 tokens")
    assert core.counters["rejected.RegistrationLimitError"] == 1 and "d2" not in core.registry
    # a known device's oversized re-registration keeps its old agreement
    again = CapabilityProfile("d1", {"imu": ModalityProfile((17, 6))})
    assert error_of(register(core, again, seq=2)).startswith("RegistrationLimitError")
    assert state(core) == before and core.registry.devices["d1"].accepted == {"imu": (4, 6), "env": (8,)}
    # exactly at the bound (4 x max_tokens = 16 tokens) is fine
    assert not register(core, CapabilityProfile("d3", {"imu": ModalityProfile((16, 6))})).out[0].topic.endswith("error")


def test_the_element_bound_is_configured() -> None:
    reg = DeviceRegistry(toy_config(modalities={"wide": toy_config().modalities["env"].__class__(token_dim=512,
                                                                                               max_tokens=64)}),
                         max_modality_elements=4096)
    with pytest.raises(RegistrationLimitError, match=r"and 4096 elements$"):
        reg.register("d", CapabilityProfile("d", {"wide": ModalityProfile((9, 512))}))  # 4608 elements
    assert reg.register("d", CapabilityProfile("d", {"wide": ModalityProfile((8, 512))})).accepted == {"wide": (8, 512)}


def test_a_full_registry_evicts_the_least_recently_seen_idle_device_instead_of_locking_out() -> None:
    now = [1000.0]
    reg = DeviceRegistry(CONFIG, max_devices=3, idle_evict_s=60.0, clock=lambda: now[0])
    env = CapabilityProfile("x", {"env": ModalityProfile((8,))})
    for i, dev in enumerate(("a", "b", "c")):
        now[0] = 1000.0 + i
        reg.register(dev, CapabilityProfile(dev, env.modalities))
    assert reg.is_new("features", "a", 3)
    from broker.wire import FeatureRecord

    now[0] = 1050.0
    reg.check("b", FeatureRecord("b", 0, {"env": np.zeros(8, np.float32)}), need_label=True)  # b sends data
    with pytest.raises(RegistrationError, match=r"^registry full \(3 devices\)$"):
        reg.register("d", CapabilityProfile("d", env.modalities))  # nobody idle for 60 s yet
    now[0] = 1100.0  # a, c registered > 60 s ago and never sent data; b sent data 50 s ago
    reg.register("d", CapabilityProfile("d", env.modalities))
    assert sorted(reg.devices) == ["b", "c", "d"] and reg.evicted == 1  # a: least recently seen
    assert "a" not in reg.guards["features"].last  # its de-dup state went with it
    reg.register("c", CapabilityProfile("c", env.modalities))  # re-registering does not refresh idleness ...
    reg.register("e", CapabilityProfile("e", env.modalities))
    assert sorted(reg.devices) == ["b", "d", "e"] and reg.evicted == 2  # ... so c goes next, b (data) stays


def test_the_edge_counts_evictions(core: EdgeCore) -> None:
    for dev in ("d1", "d2", "d3"):
        register(core, toy_profile(dev))
    for entry in core.registry.devices.values():
        entry.registered_at -= 120.0  # all idle for two minutes (limit: 60 s)
    fx = register(core, toy_profile("d4"))
    assert fx.out[0].topic.endswith("/down/config") and core.counters["devices_evicted"] == 1
    assert len(core.registry) == 3 and "d4" in core.registry


def test_found_by_fuzzing_a_global_with_alpha_zero_is_refused_not_a_crash(core: EdgeCore) -> None:
    assert core.trainer is not None
    tensors = {k: np.zeros(tuple(v.shape), np.float32) for k, v in shared_state(core.trainer.model).items()}
    body = GlobalAdapter(1, core.trainer.fingerprint, "fedavg", 8, 16.0, tensors).to_body()
    body["alpha"] = 0.0  # rescaling B divided by the sender's scaling alpha / r == 0
    fx = core.ingest(topics.global_down(), enc(Kind.GLOBAL, "cloud", 1, body))
    assert fx.applies == [] and core.counters["internal_errors"] == 0
    assert core.counters["rejected.DecodeError"] == 1


def test_found_by_fuzzing_an_empty_registered_shape_is_refused_not_a_crash(core: EdgeCore) -> None:
    body = toy_profile("d1").to_body()
    body["modalities"]["env"]["shape"] = []  # the registry read shape[-1]: IndexError
    fx = core.ingest(up(core, "d1", topics.Uplink.REGISTER), enc(Kind.REGISTER, "d1", 1, body))
    assert error_of(fx) == "DecodeError: modality shape must be 1 to 8 positive ints, got []"
    assert core.counters["internal_errors"] == 0 and "d1" not in core.registry


def test_found_by_fuzzing_a_non_ascii_chunk_index_is_rejected_not_a_crash(core: EdgeCore) -> None:
    fx = core.ingest(f"{up(core, 'd1', topics.Uplink.FEATURES)}/chunk/\u00b2", enc(Kind.CHUNK, "d1", 1, {}))
    assert fx.out == [] and core.counters["rejected.TopicError"] == 1 and core.counters["internal_errors"] == 0
