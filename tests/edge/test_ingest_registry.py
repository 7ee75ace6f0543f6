"""The ingest gate: what a registration agrees to, and which records may reach the model.

Pure registry tests (no broker, no model): every rule is restated here in its own words, so a
check that is loosened or dropped in ``edge_agent/registry.py`` fails a test.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from broker.wire import CapabilityProfile, DeviceConfig, FeatureRecord, ModalityProfile
from edge_agent.errors import (
    BadLabelError,
    NonFiniteFeaturesError,
    ProfileMismatchError,
    RegistrationError,
    UnregisteredDeviceError,
)
from edge_agent.registry import DeviceRegistry, all_finite
from edge_agent.training.toy_task import toy_config

CONFIG = toy_config()  # imu: up to 4 tokens of width 6; env: 1 token of width 8; 4 classes
WIDTH = {"imu": 6, "env": 8}


def profile(device: str, **shapes: tuple[int, ...]) -> CapabilityProfile:
    rates = {"imu": 50.0, "env": 2.0}
    mods = {m: ModalityProfile(shape=s, rate_hz=rates.get(m, 1.0)) for m, s in shapes.items()}
    return CapabilityProfile(device, mods)


def registry_with(device: str = "gw-1", **kwargs: int) -> DeviceRegistry:
    reg = DeviceRegistry(CONFIG, **kwargs)
    reg.register(device, profile(device, imu=(4, 6), env=(8,)))
    return reg


def rec(device: str, label: int | None = 0, **arrays: np.ndarray) -> FeatureRecord:
    return FeatureRecord(device=device, sample=0, modalities=arrays, label=label)


def test_registration_agrees_only_to_what_the_model_can_use() -> None:
    reg = DeviceRegistry(CONFIG)
    offered = profile("gw-1", imu=(4, 6), env=(8,), audio=(16,))
    assert reg.agreement(offered) == {"imu": (4, 6), "env": (8,)}  # audio: the model has no such input
    assert reg.agreement(profile("gw-1", imu=(4, 5), env=(8,))) == {"env": (8,)}  # wrong token width
    assert reg.agreement(profile("gw-1", imu=(2, 4, 6), env=(2, 8))) == {"env": (2, 8)}  # 3-D is no token list
    entry = reg.register("gw-1", offered)
    assert entry.config(model_version=3) == DeviceConfig(
        modalities=["env", "imu"], rate_hz={"env": 2.0, "imu": 50.0}, shapes={"env": (8,), "imu": (4, 6)},
        model_version=3)
    assert len(reg) == 1 and "gw-1" in reg and "gw-2" not in reg
    with pytest.raises(RegistrationError, match=r"^no usable modality in \['audio'\]; this edge expects "
                                                r"\{'env': \(1, 8\), 'imu': \(4, 6\)\}$"):
        reg.register("gw-2", profile("gw-2", audio=(16,)))
    with pytest.raises(RegistrationError, match=r"^profile is for 'gw-3' but arrived on 'gw-2''s topic$"):
        reg.register("gw-2", profile("gw-3", env=(8,)))
    assert len(reg) == 1


def test_re_registration_updates_the_agreement_and_a_full_registry_refuses_only_newcomers() -> None:
    reg = DeviceRegistry(CONFIG, max_devices=2)
    first = reg.register("gw-1", profile("gw-1", imu=(4, 6), env=(8,)))
    reg.register("gw-2", profile("gw-2", env=(8,)))
    with pytest.raises(RegistrationError, match=r"^registry full \(2 devices\)$"):
        reg.register("gw-3", profile("gw-3", env=(8,)))
    first.last_seen = 0.0
    again = reg.register("gw-1", profile("gw-1", imu=(2, 6)))  # a known device may always re-register
    assert again is first and again.accepted == {"imu": (2, 6)} and again.last_seen > 0.0
    assert again.counters == {"registrations": 2}
    assert reg.devices["gw-2"].counters == {"registrations": 1} and len(reg) == 2
    with pytest.raises(ProfileMismatchError):  # env was dropped from the new agreement
        reg.check("gw-1", rec("gw-1", env=np.zeros(8, np.float32)), need_label=True)
    with pytest.raises(ProfileMismatchError):  # and imu is now at most 2 tokens long
        reg.check("gw-1", rec("gw-1", imu=np.zeros((3, 6), np.float32)), need_label=True)


def test_sequence_guards_drop_repeats_per_device_and_stream_and_a_live_registration_resets_them() -> None:
    reg = registry_with("gw-1")
    reg.register("gw-2", profile("gw-2", env=(8,)))
    assert reg.is_new("features", "gw-1", 5) and not reg.is_new("features", "gw-1", 5)
    assert not reg.is_new("features", "gw-1", 4)
    assert reg.is_new("infer", "gw-1", 5)  # streams are independent
    assert reg.is_new("features", "gw-2", 1)  # and so are devices
    reg.register("gw-1", profile("gw-1", env=(8,)))  # a retained copy re-delivered: the guards stay
    assert not reg.is_new("features", "gw-1", 5) and not reg.is_new("infer", "gw-1", 5)
    reg.register("gw-1", profile("gw-1", env=(8,)), fresh=True)  # the device lost its seq store
    assert reg.is_new("features", "gw-1", 0) and reg.is_new("infer", "gw-1", 0)
    assert not reg.is_new("features", "gw-2", 1), "another device's guard was reset"
    reg.register("gw-3", profile("gw-3", env=(8,)), fresh=True)  # a first live registration: nothing to reset
    assert reg.is_new("features", "gw-3", 0)


def _fits(shape: tuple[int, ...], registered: tuple[int, ...]) -> bool:
    """The rule from the wire spec, stated independently: a registered vector ``(w,)`` accepts a
    vector ``(w,)`` or one row ``(1, w)``; a registered token list ``(T, w)`` accepts ``(t, w)`` for
    1 <= t <= T. Nothing else (no other width, no 0-D or 3-D arrays)."""
    if len(registered) == 1:
        return shape in ((registered[0],), (1, registered[0]))
    return len(shape) == 2 and shape[1] == registered[1] and 1 <= shape[0] <= registered[0]


@settings(max_examples=60, deadline=None)
@example(modality="imu", registered_tokens=4, shape=(4, 6), use_width=True)  # the full registered length
@example(modality="imu", registered_tokens=4, shape=(5, 6), use_width=True)  # one token too many
@example(modality="imu", registered_tokens=2, shape=(1, 6), use_width=True)  # a single token
@example(modality="imu", registered_tokens=2, shape=(0, 6), use_width=True)  # no token at all
@example(modality="imu", registered_tokens=2, shape=(6,), use_width=True)  # a vector for a token list
@example(modality="env", registered_tokens=1, shape=(1, 8), use_width=True)  # one row for a vector
@example(modality="env", registered_tokens=1, shape=(2, 8), use_width=True)
@example(modality="env", registered_tokens=1, shape=(1, 1, 8), use_width=True)
@given(modality=st.sampled_from(["imu", "env"]), registered_tokens=st.integers(1, 4),
       shape=st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple), use_width=st.booleans())
def test_record_shapes_follow_the_registered_agreement(modality: str, registered_tokens: int,
                                                       shape: tuple[int, ...], use_width: bool) -> None:
    width = WIDTH[modality]
    if use_width and shape:
        shape = (*shape[:-1], width)  # make the common case (right width) frequent
    registered = (registered_tokens, width) if modality == "imu" else (width,)
    reg = DeviceRegistry(CONFIG)
    reg.register("gw-1", profile("gw-1", **{modality: registered}))
    record = rec("gw-1", **{modality: np.ones(shape, np.float32)})
    if _fits(shape, registered):
        sample = reg.check("gw-1", record, need_label=True)
        assert sample["modalities"][modality].shape == shape
    else:
        with pytest.raises(ProfileMismatchError, match=rf"^modality '{modality}': shape"):
            reg.check("gw-1", record, need_label=True)


def test_records_are_checked_before_they_can_reach_the_model() -> None:
    reg = registry_with("gw-1")
    imu, env = np.ones((3, 6), np.float32), np.full((1, 8), 0.5, np.float32)
    sample = reg.check("gw-1", rec("gw-1", label=3, imu=imu, env=env), need_label=True)
    assert sample["label"] == 3 and sample["modalities"]["imu"] is imu and sample["modalities"]["env"] is env
    one_token = np.ones((1, 6), np.float32)  # a sequence may be as short as one token
    assert reg.check("gw-1", rec("gw-1", imu=one_token), need_label=True)["modalities"]["imu"] is one_token
    assert reg.check("gw-1", rec("gw-1", label=0, env=env), need_label=True)["label"] == 0
    assert reg.check("gw-1", rec("gw-1", label=None, env=env), need_label=True)["label"] is None  # unlabelled: ok
    assert reg.check("gw-1", rec("gw-1", label=9, env=env), need_label=False)["label"] is None  # inference
    with pytest.raises(BadLabelError, match=r"^label 4 outside \[0, 4\)$"):
        reg.check("gw-1", rec("gw-1", label=4, env=env), need_label=True)
    with pytest.raises(BadLabelError):
        reg.check("gw-1", rec("gw-1", label=-1, env=env), need_label=True)
    with pytest.raises(UnregisteredDeviceError, match=r"^device 'gw-9' is not registered"):
        reg.check("gw-9", rec("gw-9", env=env), need_label=True)
    with pytest.raises(ProfileMismatchError, match=r"^record names device 'gw-2' but came from 'gw-1'$"):
        reg.check("gw-1", rec("gw-2", env=env), need_label=True)
    with pytest.raises(ProfileMismatchError, match=r"^modality 'audio' is not in 'gw-1''s agreement \['env', 'imu'\]$"):
        reg.check("gw-1", rec("gw-1", audio=np.zeros(8, np.float32)), need_label=True)
    with pytest.raises(ProfileMismatchError, match=r"^modality 'env': expected floats, got int32$"):
        reg.check("gw-1", rec("gw-1", env=np.zeros(8, np.int32)), need_label=True)
    for bad in (np.nan, np.inf, -np.inf):
        poisoned = np.ones((2, 6), np.float32)
        poisoned[1, 4] = bad
        with pytest.raises(NonFiniteFeaturesError, match=r"^modality 'imu' contains NaN or infinite values$"):
            reg.check("gw-1", rec("gw-1", imu=poisoned, env=env), need_label=True)
    as_double = reg.check("gw-1", rec("gw-1", env=np.ones(8, np.float64)), need_label=True)
    assert as_double["modalities"]["env"].shape == (8,)  # any float width is fine


def test_last_seen_moves_with_every_record_checked() -> None:
    reg = registry_with("gw-1")
    entry = reg.devices["gw-1"]
    entry.last_seen = 0.0
    reg.check("gw-1", rec("gw-1", env=np.ones(8, np.float32)), need_label=True)
    assert entry.last_seen > 0.0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=1, max_size=12))
def test_all_finite_is_true_exactly_when_no_value_is_nan_or_infinite(values: list[float]) -> None:
    expected = not any(v != v or v in (float("inf"), float("-inf")) for v in values)
    array = np.array(values, np.float32)
    assert all_finite(array) is expected and all_finite(array.reshape(1, -1)) is expected


def test_registry_state_survives_a_restart_and_drops_devices_the_model_no_longer_fits() -> None:
    reg = registry_with("gw-1")
    reg.register("gw-2", profile("gw-2", imu=(2, 6)))
    reg.devices["gw-1"].count("records", 7)
    reg.devices["gw-1"].registered_at, reg.devices["gw-1"].last_seen = 100.0, 250.5
    assert reg.is_new("features", "gw-1", 41) and reg.is_new("infer", "gw-2", 3)
    saved = reg.to_dict()
    assert saved["guards"] == {"features": {"gw-1": 41}, "infer": {"gw-2": 3}}
    assert [d["device"] for d in saved["devices"]] == ["gw-1", "gw-2"]
    assert saved["devices"][0]["counters"] == {"registrations": 1, "records": 7}
    assert (saved["devices"][0]["registered_at"], saved["devices"][0]["last_seen"]) == (100.0, 250.5)

    restored = DeviceRegistry(CONFIG)
    restored.load_dict({**saved, "guards": {**saved["guards"], "telemetry": {"gw-1": 5}}})
    one = restored.devices["gw-1"]
    assert one.accepted == {"imu": (4, 6), "env": (8,)} and one.counters == {"registrations": 1, "records": 7}
    assert (one.registered_at, one.last_seen) == (100.0, 250.5)
    assert restored.devices["gw-2"].accepted == {"imu": (2, 6)}
    assert not restored.is_new("features", "gw-1", 41) and restored.is_new("features", "gw-1", 42)
    assert not restored.is_new("infer", "gw-2", 3) and restored.is_new("infer", "gw-1", 0)
    assert set(restored.guards) == {"features", "infer"}

    assert one.device == "gw-1" and restored.devices["gw-2"].device == "gw-2"
    assert restored.to_dict()["devices"] == saved["devices"]  # profiles included: saved again unchanged
    assert one.config(2).rate_hz == {"env": 2.0, "imu": 50.0}

    env_only = DeviceRegistry(toy_config(modalities={"env": CONFIG.modalities["env"]}))
    env_only.load_dict({**saved, "devices": saved["devices"][::-1]})  # the unusable one comes first
    assert list(env_only.devices) == ["gw-1"]  # gw-2 only had imu, which this model lacks
    assert env_only.devices["gw-1"].accepted == {"env": (8,)}
    # a state file from before the timestamps and counters were kept
    legacy = DeviceRegistry(CONFIG)
    legacy.load_dict({"devices": [{"device": "gw-1", "profile": saved["devices"][0]["profile"]}]})
    entry = legacy.devices["gw-1"]
    assert (entry.registered_at, entry.last_seen, entry.counters) == (0.0, 0.0, {})
    empty = DeviceRegistry(CONFIG)
    empty.load_dict({})
    assert len(empty) == 0
