"""The service's parts without a broker: config layering, the deploy files, naming, drift, state guard."""

from __future__ import annotations

import configparser
from pathlib import Path

import numpy as np
import pytest
import torch

from broker.address import BrokerAddress
from cloud_aggregator.cli import serve
from cloud_aggregator.config import CloudConfigError, dumps_cloud_config, load_cloud_config, write_cloud_config
from cloud_aggregator.contribution import GlobalState
from cloud_aggregator.core import AggregatorCore
from cloud_aggregator.drift import relative_drift
from cloud_aggregator.reference import StateMismatch
from cloud_aggregator.strategies import get_strategy
from megace_common.lora import modality_of
from tests.support.cloud_bus import MODALITIES, cloud_config
from tests.support.cloud_testkit import make_contribution

ROOT = Path(__file__).resolve().parents[2]
ADDR = BrokerAddress("127.0.0.1", 1)


def test_example_config_loads_and_env_then_overrides_win(tmp_path: Path):
    example = ROOT / "deploy" / "cloud.example.toml"
    base = load_cloud_config(example, environ={})
    assert base.aggregation.strategy == "modality-aware" and base.model.lora_r == 8
    env = {
        "MEGACE_CLOUD__AGGREGATION__BUFFER_K": "7",
        "MEGACE_CLOUD__BROKER": "mqtts://u:p@broker:8883",
        "MEGACE_CLOUD__AGGREGATION__DISCOUNT_OPTIONS": "{a = 1.5}",
        "OTHER__AGGREGATION__BUFFER_K": "99",
    }
    cfg = load_cloud_config(example, {"aggregation.buffer_k": 9, "limits": {"torch_threads": 2}}, environ=env)
    assert cfg.aggregation.buffer_k == 9  # overrides beat env
    assert cfg.broker == "mqtts://u:p@broker:8883" and cfg.aggregation.discount_options == {"a": 1.5}
    assert cfg.limits.torch_threads == 2 and cfg.limits.metrics_period_s == base.limits.metrics_period_s
    path = write_cloud_config(cfg, tmp_path / "c.toml")
    assert load_cloud_config(path, environ={}) == cfg
    assert "[aggregation]" in dumps_cloud_config(cfg)


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"aggregation": {"bufer_k": 2}}, "unknown key"),
        ({"model": None}, "must be a table"),
        ({"aggregation": {"buffer_k": 0}}, "buffer_k"),
        ({"cloud_id": "a/b"}, "cloud_id"),
        ({"cloud_id": "cloud.a"}, r"invalid cloud_id 'cloud\.a'.*RabbitMQ"),  # portable across brokers: no dots
        ({"cloud_id": "clöud"}, "cloud_id"),  # str.isalnum() took non-ASCII letters
        ({"model": {"modalities": {}, "num_classes": 3}}, "modalities"),
    ],
)
def test_bad_configs_are_refused_with_a_reason(tmp_path: Path, overrides, match):
    with pytest.raises(CloudConfigError, match=match):
        cloud_config(tmp_path, ADDR, **overrides)


def test_cli_exits_2_on_a_bad_config(tmp_path: Path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('cloud_id = "x"\n[aggregation]\nstrategy = "fedavg"\n')
    assert serve(str(bad)) == 2
    assert "missing [model]" in capsys.readouterr().err


def test_systemd_unit_is_hardened_and_restarts_on_failure():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(ROOT / "deploy" / "systemd" / "megace-cloud.service")
    svc = unit["Service"]
    assert svc["ExecStart"] == "/opt/megace/venv/bin/megace cloud --config /etc/megace/cloud.toml"
    assert svc["Restart"] == "on-failure" and svc["User"] == "megace" and svc["KillSignal"] == "SIGTERM"
    assert svc["StateDirectory"] == "megace/cloud"
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices"):
        assert svc[key] == "yes", key
    assert svc["ProtectSystem"] == "strict"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_modality_of_module_names_as_peft_gives_them():
    assert modality_of("base_model.model.modality_proj.audio") == "audio"
    assert modality_of("base_model.model.modality_proj.audio.lora_A.weight") == "audio"
    assert modality_of("base_model.model.backbone.encoder.layer.0.attention.self.query") is None


def test_modality_aware_with_peft_module_names_ignores_edges_without_the_modality():
    mods = {"base_model.model.modality_proj.audio": (8, 4), "base_model.model.q": (8, 6)}
    with_audio = make_contribution(0, 4, mods, modalities={"audio": 5})
    without = make_contribution(1, 4, mods, modalities={"image": 5})
    g = get_strategy("modality-aware").aggregate(None, [with_audio, without])
    name = "base_model.model.modality_proj.audio.lora_A.weight"
    torch.testing.assert_close(g.tensors[name], with_audio.tensors[name].astype(np.float32), check_dtype=False)


def test_drift_is_zero_against_itself_and_scale_invariant():
    mods = {"m": (6, 5)}
    c = make_contribution(0, 3, mods, alpha=6.0)
    g = GlobalState(1, {"m.lora_A.weight": c.tensors["m.lora_A.weight"],
                          "m.lora_B.weight": c.tensors["m.lora_B.weight"] * c.scaling})
    assert relative_drift(c, g) == pytest.approx(0.0, abs=1e-6)
    g2 = GlobalState(2, {k: v * (2.0 if ".lora_B." in k else 1.0) for k, v in g.tensors.items()})
    assert relative_drift(c, g2) == pytest.approx(0.5)  # ||x - 2x|| / ||2x||
    zero = GlobalState(3, {k: np.zeros_like(v) for k, v in g.tensors.items()})
    assert relative_drift(c, zero) is None


def test_state_dir_of_another_base_is_refused(tmp_path: Path):
    cfg = cloud_config(tmp_path / "s", ADDR)
    core = AggregatorCore(cfg)
    assert core.version == 0 and core.glob.tensors.keys() == core.view(_profile(8)).keys()
    core.close()
    other = {**MODALITIES, "audio": {"token_dim": 13, "max_tokens": 2}}
    cfg2 = cloud_config(tmp_path / "s", ADDR, model={"modalities": other, "num_classes": 3})
    with pytest.raises(StateMismatch, match="another state_dir"):
        AggregatorCore(cfg2)
    reopened = AggregatorCore(cfg)  # the matching base resumes, without rebuilding the model
    assert reopened.version == 0 and reopened.fingerprint == core.fingerprint
    reopened.close()


def _profile(rank: int):  # type: ignore[no-untyped-def]
    from cloud_aggregator.sites import SiteProfile

    return SiteProfile(site="x", edge="e", rank=rank, alpha=2.0 * rank, modalities={"audio": 1, "image": 1},
                       last_seq=1)


def test_reference_accepts_the_personal_tensors_of_share_personal_edges(tmp_path: Path) -> None:
    from cloud_aggregator.reference import open_reference
    from megace_model.adapters import build_edge_model, personal_state

    cfg = cloud_config(tmp_path, BrokerAddress("127.0.0.1", 1))
    ref, initial = open_reference(tmp_path, cfg.model, need_initial=True)
    personal = personal_state(build_edge_model(cfg.model))
    assert initial is not None and personal
    for name, t in personal.items():
        assert ref.schema.extras["base_model.model." + name] == tuple(t.shape)
    assert not any(".lora_" in n for n in ref.schema.extras)
