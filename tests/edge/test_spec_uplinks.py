"""SPEC §3 as a real EdgeCore enforces it on device uplinks: who may speak for a device (``s`` and ``ct``),
which dtypes and token layouts a registration and its records may use, what ``config`` and ``error`` say,
the per-(stream, device) duplicate guard, and how replies correlate with requests.

Payloads are made with the reference encoder the way a device makes them; every expectation is read back by
decoding what the core returned, with the codes and numbers written out here, not taken from the edge.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from broker import topics
from broker.address import BrokerAddress
from broker.wire import (
    CapabilityProfile,
    DeviceConfig,
    ErrorReport,
    FeatureRecord,
    FeedbackMessage,
    GlobalAdapter,
    Kind,
    ModalityProfile,
    Prediction,
    decode_envelope,
    encode_envelope,
)
from edge_agent.checkpoints import build_trainer
from edge_agent.core import EdgeCore, Effects
from megace_model.adapters import shared_state
from tests.support.edge_testkit import edge_config, toy_profile

torch.set_num_threads(1)

DEV = "dev-1"
NOWHERE = BrokerAddress("127.0.0.1", 1)  # never connected to: the core has no network


@pytest.fixture
def core(tmp_path: Path) -> EdgeCore:
    config = edge_config(tmp_path / "state", NOWHERE, {"training": {"min_new_samples": 1000}})
    return EdgeCore(config, trainer=build_trainer(config))


def send(core: EdgeCore, what: topics.Uplink, body: dict[str, Any], *, seq: int, device: str = DEV,
         sender: str | None = None, ctype: str | None = None, retained: bool = False) -> Effects:
    kind = {"register": Kind.REGISTER, "features": Kind.FEATURES, "infer": Kind.INFER}[what.value]
    payload = encode_envelope(kind, device if sender is None else sender, seq, body, ctype=ctype)
    return core.ingest(topics.device_up(core.site, device, what), payload, retained=retained)


def register(core: EdgeCore, profile: CapabilityProfile | None = None, *, seq: int = 1, device: str = DEV,
             retained: bool = False) -> Effects:
    prof = profile or toy_profile(device)
    return send(core, topics.Uplink.REGISTER, prof.to_body(), seq=seq, device=device, retained=retained)


def feats(core: EdgeCore, seq: int, *, device: str = DEV, label: int | None = 1, **mods: np.ndarray) -> Effects:
    mods = mods or {"env": np.ones(8, np.float32)}
    return send(core, topics.Uplink.FEATURES, FeatureRecord(device, seq, mods, label=label).to_body(), seq=seq,
                device=device)


def replies(fx: Effects, kind: Kind) -> list[Any]:
    out = []
    for msg in fx.out:
        env = decode_envelope(msg.payload)
        if env.kind is kind:
            out.append({Kind.ERROR: ErrorReport, Kind.CONFIG: DeviceConfig}[kind].from_body(env.body))
    return out


def codes(fx: Effects) -> list[tuple[str, int | None]]:
    return [(e.code, e.ref) for e in replies(fx, Kind.ERROR)]


def buffered(core: EdgeCore) -> int:
    assert core.trainer is not None
    return len(core.trainer.buffer)


# ------------------------------------------------------------------- s and ct
@pytest.mark.parametrize("what", ["register", "features", "infer"])
def test_an_envelope_whose_sender_is_not_the_topics_device_is_refused_typed_counted_and_changes_nothing(
        core: EdgeCore, what: str) -> None:
    register(core)
    guards = {k: dict(g.last) for k, g in core.registry.guards.items()}
    profile_before = core.registry.devices[DEV].profile
    body = (toy_profile("dev-2") if what == "register" else FeatureRecord(DEV, 5, {"env": np.ones(8, np.float32)},
                                                                          label=1)).to_body()
    fx = send(core, topics.Uplink(what), body, seq=5, sender="dev-2")
    assert codes(fx) == [("sender_mismatch", 5)] and not fx.infers and not replies(fx, Kind.CONFIG)
    assert fx.out[0].topic == f"megace/v1/site/{core.site}/device/{DEV}/down/error"  # told to the topic's device
    assert core.counters["rejected.SenderMismatchError"] == 1
    assert "dev-2" not in core.registry and core.registry.devices[DEV].profile is profile_before
    assert {k: dict(g.last) for k, g in core.registry.guards.items()} == guards and buffered(core) == 0
    # the guard did not move: the real device's record under the same n is accepted
    if what == "features":
        assert feats(core, 5).out == [] and buffered(core) == 1


def test_an_uplink_whose_content_type_is_not_its_kinds_is_malformed(core: EdgeCore) -> None:
    register(core)
    body = FeatureRecord(DEV, 5, {"env": np.ones(8, np.float32)}, label=1).to_body()
    fx = send(core, topics.Uplink.FEATURES, body, seq=5, ctype="application/vnd.megace.register+msgpack")
    assert codes(fx) == [("malformed", 5)] and core.counters["rejected.DecodeError"] == 1 and buffered(core) == 0
    fx = send(core, topics.Uplink.FEATURES, body, seq=5, ctype="application/vnd.megace.features+msgpack")
    assert fx.out == [] and buffered(core) == 1


# ----------------------------------------------------- dtypes and token layout
def test_a_non_float_dtype_for_a_modality_the_edge_uses_refuses_the_registration(core: EdgeCore) -> None:
    prof = CapabilityProfile(DEV, {"imu": ModalityProfile((4, 6), "<i2", 10.0), "env": ModalityProfile((8,))})
    fx = register(core, prof, seq=3)
    assert codes(fx) == [("registration_dtype", 3)] and replies(fx, Kind.CONFIG) == []
    assert DEV not in core.registry and core.counters["rejected.RegistrationDtypeError"] == 1
    # a modality this edge does not use is not judged: it is left out of the config like any other
    prof = CapabilityProfile(DEV, {"text": ModalityProfile((16,), "<i8", 1.0), "env": ModalityProfile((8,), "<f8")})
    (cfg,) = replies(register(core, prof, seq=4), Kind.CONFIG)
    assert (cfg.modalities, cfg.shapes) == (["env"], {"env": (8,)})


def test_a_records_float_width_need_not_match_the_registered_one_but_it_must_be_a_float(core: EdgeCore) -> None:
    register(core)  # env registered as <f4
    assert feats(core, 2, env=np.ones(8, "<f8")).out == [] and feats(core, 3, env=np.ones(8, "<f2")).out == []
    assert buffered(core) == 2
    assert codes(feats(core, 4, env=np.ones(8, "<i4"))) == [("profile_mismatch", 4)]
    assert codes(feats(core, 5, env=np.full(8, 1e300, "<f8"))) == [("non_finite", 5)]
    assert buffered(core) == 2


def test_the_config_gives_the_registered_token_layout_and_records_follow_it(core: EdgeCore) -> None:
    (cfg,) = replies(register(core), Kind.CONFIG)  # imu [4, 6]: 4 tokens of width 6; env [8]: one token
    assert cfg.shapes == {"imu": (4, 6), "env": (8,)} and cfg.modalities == ["env", "imu"]
    ok = {"imu [1,6]": np.ones((1, 6), np.float32), "imu [4,6]": np.ones((4, 6), np.float32)}
    for seq, imu in enumerate(ok.values(), start=10):
        assert feats(core, seq, imu=imu).out == []
    assert feats(core, 12, env=np.ones((1, 8), np.float32)).out == []  # [d] registered: [1, d] is the same token
    bad = [np.ones((5, 6), np.float32), np.ones(6, np.float32), np.ones((4, 7), np.float32),
           np.ones((1, 4, 6), np.float32)]
    for seq, imu in enumerate(bad, start=20):
        assert codes(feats(core, seq, imu=imu)) == [("profile_mismatch", seq)]
    assert buffered(core) == 3


def test_a_registration_with_no_modality_that_fits_gets_an_error_naming_the_layout_and_no_config(
        core: EdgeCore) -> None:
    prof = CapabilityProfile(DEV, {"imu": ModalityProfile((4, 5)), "env": ModalityProfile((2, 3, 8))})
    fx = register(core, prof, seq=6)
    assert codes(fx) == [("registration", 6)] and replies(fx, Kind.CONFIG) == [] and DEV not in core.registry
    (err,) = replies(fx, Kind.ERROR)
    assert "this edge expects" in err.message and "'imu': (" in err.message and ", 6)" in err.message


# ------------------------------------------------------------- duplicate scope
def test_duplicates_are_per_stream_and_per_device(core: EdgeCore) -> None:
    register(core)
    register(core, device="dev-2")
    assert feats(core, 5).out == [] and buffered(core) == 1
    assert feats(core, 5).out == [] and buffered(core) == 1 and core.counters["duplicates"] == 1
    assert feats(core, 5, device="dev-2").out == [] and buffered(core) == 2  # another device: its own guard
    infer = FeatureRecord(DEV, 77, {"env": np.ones(8, np.float32)}).to_body()
    fx = send(core, topics.Uplink.INFER, infer, seq=5)  # the infer stream has its own guard too
    assert [(r.sample_id, r.seq) for r in fx.infers] == [(77, 5)]
    fx = send(core, topics.Uplink.INFER, infer, seq=5)
    assert fx.infers == [] and fx.out == [] and core.counters["duplicates"] == 2  # a duplicate gets no reply


@pytest.mark.parametrize(("epochs", "retained", "resets"), [
    ((0, 0), True, False),    # a redelivered retained registration never resets
    ((0, 0), False, True),    # no epoch: a live one at an old n means the device lost its store
    ((11, 11), False, False),  # same epoch: the device's seqs did not start over
    ((11, 12), True, True),    # a new epoch: they did, retained or not
])
def test_a_re_registration_at_an_old_seq_resets_the_guard_only_when_the_device_restarted(
        core: EdgeCore, epochs: tuple[int, int], retained: bool, resets: bool) -> None:
    first, again = (CapabilityProfile(DEV, dict(toy_profile(DEV).modalities), epoch=e) for e in epochs)
    register(core, first, seq=1)
    assert feats(core, 50).out == [] and buffered(core) == 1
    (cfg,) = replies(register(core, again, seq=2, retained=retained), Kind.CONFIG)  # answered with a config
    assert cfg.modalities == ["env", "imu"]
    feats(core, 3)
    assert buffered(core) == (2 if resets else 1)


# ---------------------------------------------------------------- correlation
def test_a_prediction_echoes_the_requests_sample_and_an_error_gives_its_n(core: EdgeCore) -> None:
    register(core)
    body = FeatureRecord(DEV, 4242, {"env": np.ones(8, np.float32)}).to_body()
    (request,) = send(core, topics.Uplink.INFER, body, seq=31).infers
    out = core.prediction(request, 1, np.array([0.25, 0.75], np.float32), 3)
    pred = Prediction.from_body(decode_envelope(out.payload).body)
    assert (pred.device, pred.sample, pred.label) == (DEV, 4242, 1)
    assert out.topic == f"megace/v1/site/{core.site}/device/{DEV}/down/prediction"
    bad = FeatureRecord(DEV, 4243, {"env": np.ones(3, np.float32)}).to_body()
    assert codes(send(core, topics.Uplink.INFER, bad, seq=32)) == [("profile_mismatch", 32)]
    fx = core.ingest(topics.device_up(core.site, DEV, topics.Uplink.INFER), b"\xc1garbage")
    assert codes(fx) == [("malformed", None)]  # no envelope could be read: no ref


def test_what_the_edge_installs_is_named_by_a_documented_feedback_message(core: EdgeCore) -> None:
    assert core.trainer is not None
    tensors = {k: np.zeros(tuple(v.shape), np.float32) for k, v in shared_state(core.trainer.model).items()}
    glob = GlobalAdapter(2, core.trainer.fingerprint, "fedavg", 8, 16.0, tensors)
    fx = core.ingest(topics.global_down(), encode_envelope(Kind.GLOBAL, "cloud", 2, glob.to_body()))
    assert [j.source for j in fx.applies] == ["global"]
    assert {j.source for j in fx.applies} <= {m.value for m in FeedbackMessage}
