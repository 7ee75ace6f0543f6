"""The one config layering both services load through (``megace_common.configfile.load_layers``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from megace_common.configfile import load_layers


class Refused(ValueError):
    pass


def test_file_then_environment_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "x.toml"
    path.write_text('name = "a"\n[model]\nr = 4\nmodalities = { imu = { dim = 6, tokens = 2 }, env = { dim = 8 } }\n')
    env = {"X__MODEL__R": "8", "X__MODEL__MODALITIES__IMU__TOKENS": "5", "X__NAME": "b", "Y__NAME": "no"}
    data = load_layers(path, "X__", {"model.alpha": 16, "limits": {"q": 1}}, environ=env, error=Refused)
    assert data == {"name": "b", "limits": {"q": 1},
                    "model": {"r": 8, "alpha": 16, "modalities": {"imu": {"dim": 6, "tokens": 5}, "env": {"dim": 8}}}}
    # a modality set given as a table replaces the old one whole; other tables merge key by key
    data = load_layers(path, "X__", {"model": {"modalities": {"audio": {"dim": 1}}}}, environ={}, error=Refused)
    assert data["model"] == {"r": 4, "modalities": {"audio": {"dim": 1}}}


def test_overrides_are_copied_and_bad_layers_raise_the_services_error(tmp_path: Path) -> None:
    given = {"model": {"modalities": {"imu": {"dim": 6}}}}
    data = load_layers(None, "X__", given, environ={})
    data["model"]["modalities"]["imu"]["dim"] = 7
    assert given == {"model": {"modalities": {"imu": {"dim": 6}}}}
    with pytest.raises(Refused, match="name is not a table"):
        load_layers(None, "X__", {"name": "a", "name.first": "b"}, environ={}, error=Refused)
    with pytest.raises(Refused, match="cannot read edge config"):
        load_layers(tmp_path / "missing.toml", "X__", environ={}, error=Refused, what="edge config")
    (tmp_path / "bad.toml").write_text("= nope")
    with pytest.raises(Refused, match="cannot read"):
        load_layers(tmp_path / "bad.toml", "X__", environ={}, error=Refused)
