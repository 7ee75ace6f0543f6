"""The gateway distribution (``sdk/``): a real wheel, built offline, is small, self-contained and works.

The wheel is built from a copy of the repository's ``sdk/``, ``broker/`` and ``device_sdk/`` (whole, so
the py-modules list is what keeps the rest of ``broker`` out), installed with ``pip --target``, and
imported by an interpreter that sees only that folder and the folders of paho-mqtt, msgpack and numpy:
no repository, no editable install. From there a device publishes through a real Mosquitto.
"""

from __future__ import annotations

import email.parser
import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker import topics
from broker.address import BrokerAddress
from broker.wire import Kind
from sdk.modules import ROOT, sdk_modules
from tests.support.collector import Collector

DEPS = {"paho-mqtt", "msgpack", "numpy"}
HEAVY = re.compile(r"torch|transformers|peft|onnx|aiomqtt|amqtt|safetensors|megace_model|edge_agent|cloud_aggregator")
PIP_ENV = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
"""Nothing is downloaded: the build uses this venv's setuptools (no isolation) and pip never asks an index."""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("sdk-src")
    junk = shutil.ignore_patterns("__pycache__", "*.pyc", "build", "*.egg-info")
    for folder in ("sdk", "broker", "device_sdk"):
        shutil.copytree(ROOT / folder, src / folder, ignore=junk)
    out = tmp_path_factory.mktemp("sdk-wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(src / "sdk")], check=True, env=PIP_ENV, timeout=300, capture_output=True)
    (built,) = out.glob("*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("sdk-target")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, env=PIP_ENV, timeout=300, capture_output=True)
    return target


def _metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        return email.parser.Parser().parsestr(z.read(name).decode())


def _requirement_name(spec: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", spec.strip(), maxsplit=1)[0].lower()


def test_metadata_asks_for_python_39_and_only_paho_msgpack_numpy(wheel: Path) -> None:
    meta = _metadata(wheel)
    assert (meta["Name"], meta["Requires-Python"]) == ("megace-device-sdk", ">=3.9")
    requires = meta.get_all("Requires-Dist") or []
    always = {_requirement_name(r) for r in requires if "extra ==" not in r}
    extras: dict[str, set[str]] = {}
    for r in requires:
        if "extra ==" in r:
            extras.setdefault(r.split("extra ==")[1].strip(" '\""), set()).add(_requirement_name(r))
    assert always == DEPS
    assert set(meta.get_all("Provides-Extra") or []) == set(extras)
    assert extras["signing"] == {"cryptography"}
    assert extras["local"] == {"onnxruntime"}  # device_sdk.local_model: onnxruntime imported only with a model
    assert extras["extractors"] == {"onnxruntime", "tokenizers"}  # device_sdk.extractors, opened on demand
    assert not any(HEAVY.search(r) for r in requires if "extra ==" not in r)
    assert not any(re.match(r"torch|transformers|peft", _requirement_name(r)) for r in requires)
    assert wheel.name.endswith("-py3-none-any.whl")  # pure Python: one wheel for every gateway


def test_wheel_holds_exactly_the_modules_the_sdk_imports(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    code = [n for n in names if ".dist-info/" not in n]
    assert all(n.endswith(".py") for n in code), code
    shipped = {n[: -len(".py")].replace("/", ".").removesuffix(".__init__") for n in code}
    needed = set(sdk_modules())
    assert shipped - needed == set(), "shipped but not imported by the SDK: fix py-modules in sdk/pyproject.toml"
    assert needed - shipped == set(), "imported by the SDK but not shipped: add to py-modules in sdk/pyproject.toml"
    assert not any(HEAVY.search(n) for n in names)
    assert "broker/aio.py" not in names and not any(n.startswith("broker/runners/") for n in names)


def _dep_dirs() -> list[str]:
    """The folders holding paho, msgpack and numpy (this venv's site-packages), and nothing of the repository."""
    dirs = {str(Path(importlib.util.find_spec(m).submodule_search_locations[0]).parent)  # type: ignore[union-attr,index]
            for m in ("paho", "msgpack", "numpy")}
    assert not any(Path(d).resolve() == ROOT for d in dirs)
    return sorted(dirs)


DEVICE = r"""
import json, sys
sys.path[:0] = json.loads(sys.argv[1])
import numpy as np
import device_sdk
from device_sdk import DeviceClient, FeatureRecord, CapabilityProfile, ModalityProfile
addr, store = sys.argv[2], sys.argv[3]
with DeviceClient("wh", "gw-1", addr, store_path=store) as dev:
    assert dev.online, "not connected"
    dev.register(CapabilityProfile("gw-1", {"accel": ModalityProfile((4, 3), "<f4", 10.0)}))
    for i in range(5):
        dev.publish(FeatureRecord("gw-1", i, {"accel": np.full((4, 3), i, np.float32)}, label=i % 2))
    big = FeatureRecord("gw-1", 5, {"accel": np.ones((4, 3), np.float32), "audio": np.zeros(300_000, np.float32)})
    dev.publish(big)  # 1.2 MB: travels as chunks
    assert dev.flush(20), "not acknowledged"
loaded = {n: getattr(m, "__file__", None) for n, m in sys.modules.items()}
print(json.dumps(loaded))
"""


def test_installed_wheel_works_on_its_own_against_a_real_broker(
        installed: Path, mosquitto_addr: BrokerAddress, tmp_path: Path) -> None:
    path = [str(installed), *_dep_dirs()]
    with Collector(mosquitto_addr, *topics.subscriptions(topics.site_device_uplinks("wh"))) as col:
        # -I: no PYTHONPATH, user site or script folder; -S: no site-packages (so no editable megace either)
        out = subprocess.run([sys.executable, "-I", "-S", "-B", "-c", DEVICE, json.dumps(path),
                              mosquitto_addr.url(), str(tmp_path / "gw.sqlite")],
                             cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
        got = col.wait_for(7)
    loaded: dict[str, str | None] = json.loads(out.stdout)
    ours = {n: f for n, f in loaded.items() if n.split(".")[0] in ("broker", "device_sdk")}
    assert set(ours) >= {"device_sdk.client", "broker.wire.envelope", "broker.compat"}
    assert all(f and Path(f).is_relative_to(installed) for f in ours.values()), ours
    assert not any(HEAVY.match(n) or n.split(".")[0] == "cryptography" for n in loaded)
    kinds = [(env.kind, env.body.get("sample")) for _, env in got]
    assert kinds[0] == (Kind.REGISTER, None)
    assert [s for k, s in kinds if k is Kind.FEATURES] == [0, 1, 2, 3, 4, 5]
    assert got[-1][1].body["modalities"]["audio"]["shape"] == [300_000]


def _python39() -> Iterator[str]:
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    yield from sorted(glob.glob(str(pyenv / "versions/3.9.*/bin/python3")))
    if shutil.which("python3.9"):
        yield "python3.9"


def test_pip_on_python_39_installs_the_wheel(wheel: Path, tmp_path: Path) -> None:
    """Where a 3.9 interpreter is installed: its own pip accepts the wheel, and what it installed imports there."""
    python = next((p for p in _python39() if subprocess.run(
        [p, "-m", "pip", "--version"], capture_output=True, timeout=60).returncode == 0), None)
    if python is None:
        pytest.skip("no Python 3.9 with pip here (pyenv or PATH)")
    target = tmp_path / "py39"
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, env=PIP_ENV, timeout=300, capture_output=True)
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); from broker import topics; "
             "from broker.address import BrokerAddress; import broker.compat; "
             "print(topics.parse('megace/v1/status/device/gw-1').base, BrokerAddress.from_url('mqtt://h', env={}))")
    out = subprocess.run([python, "-I", "-S", "-B", "-c", probe, str(target)], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["megace/v1/status/device/gw-1", "mqtt://h:1883"]
