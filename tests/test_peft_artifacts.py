"""Exported adapters load with plain peft onto the documented base builder and give megace's own outputs.

The edge's artifact comes from a real Trainer (two steps on the toy task) through the edge's real export
path; the global from a real AggregatorCore fed two real uploads, exported with ``megace export-global``.
A subprocess whose only megace import is ``megace_model.build_base`` loads each with
``PeftModel.from_pretrained`` and computes logits on saved inputs; the parent compares them with the
trainer's model (edge) and with a megace edge model that installed the global the way an edge does
(B rescaled from scaling 1 to its own alpha/r). The artifacts as they were before (a global with no
adapter_config, or with the edge's alpha; an edge artifact without its personal part) fail the same check.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from broker import topics
from broker.address import BrokerAddress
from cloud_aggregator.config import dumps_cloud_config
from cloud_aggregator.core import AggregatorCore
from edge_agent.checkpoints import export_adapter
from edge_agent.training.toy_task import ToyTask, toy_config
from edge_agent.training.trainer import Trainer
from megace.cli import app
from megace_common.lora import is_lora_b, lora_scaling, rescale_b
from megace_model.adapters import apply_global, build_edge_model
from megace_model.base import PERSONAL_FILE
from megace_model.batch import Batch, collate
from megace_model.config import EdgeModelConfig
from megace_model.export import CONFIG_FILE, WEIGHTS_FILE, export_global
from megace_model.fingerprint import base_fingerprint
from tests.support.cloud_bus import cloud_config, model_config, update_payload

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5

#: What a user runs: plain peft on the documented builder; reports errors per artifact instead of stopping.
LOADER = """
import json, sys
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from megace_model import build_base

jobs, results = json.loads(sys.argv[1]), {}
for artifact, inputs, out in jobs:
    try:
        x = load_file(inputs)
        group = lambda p: {k[len(p):]: v for k, v in x.items() if k.startswith(p)}
        model = PeftModel.from_pretrained(build_base(artifact), artifact).eval()
        with torch.no_grad():
            logits = model(features=group("features."), token_mask=group("token_mask."), presence=x["presence"]).logits
        save_file({"logits": logits.contiguous()}, out)
        results[artifact] = "ok"
    except Exception as exc:
        results[artifact] = f"{type(exc).__name__}: {exc}"
leaked = sorted(m for m in sys.modules if m.split(".")[0] in {"edge_agent", "cloud_aggregator", "megace"})
print(json.dumps({"results": results, "leaked": leaked}))
"""


def save_inputs(batch: Batch, path: Path) -> Path:
    flat = {f"features.{k}": v for k, v in batch.features.items()}
    flat.update({f"token_mask.{k}": v for k, v in batch.token_mask.items()})
    save_file({**flat, "presence": batch.presence}, str(path))
    return path


def logits_of(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch.model_inputs()).logits


def load_with_plain_peft(jobs: list[tuple[Path, Path]], tmp: Path) -> dict[Path, torch.Tensor | str]:
    """Logits per artifact from a fresh interpreter (or the error it raised)."""
    spec = [(str(a), str(i), str(tmp / f"out-{n}.safetensors")) for n, (a, i) in enumerate(jobs)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", LOADER, json.dumps(spec)], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["leaked"] == [], "the loader imported megace beyond the base builder"
    return {Path(a): (load_file(o)["logits"] if report["results"][a] == "ok" else report["results"][a])
            for a, _, o in spec}


def max_diff(got: torch.Tensor | str, want: torch.Tensor) -> float:
    """Max abs difference; infinite when plain peft could not load the artifact at all."""
    return float((got - want).abs().max()) if isinstance(got, torch.Tensor) else float("inf")


def edge_artifact(config: EdgeModelConfig, tmp: Path) -> tuple[Path, Path, torch.Tensor]:
    """(artifact written by the edge's export path, saved inputs, the trainer model's logits on them)."""
    task = ToyTask(config, seed=3)
    trainer = Trainer(config, device="cpu")
    for sample in task.samples(48):
        trainer.add_sample(sample, device_id="dev-1")
    trainer.train_round(steps=2, batch_size=16)
    export_adapter(types.SimpleNamespace(root=tmp / "edge-state"), trainer)  # type: ignore[arg-type]
    batch = collate(task.samples(12), config, with_labels=False)
    return tmp / "edge-state" / "adapter", save_inputs(batch, tmp / "edge-inputs.safetensors"), logits_of(
        trainer.model, batch)


def installed_like_an_edge(glob: dict[str, torch.Tensor], config: EdgeModelConfig) -> torch.nn.Module:
    """A megace edge model with the global installed as views.py does: B / (alpha/r)."""
    model = build_edge_model(config)
    own = lora_scaling(config.lora_alpha, config.lora_r)
    apply_global(model, {k: (rescale_b(v, 1.0, own) if is_lora_b(k) else v) for k, v in glob.items()})
    return model


def test_edge_and_global_artifacts_load_with_plain_peft(tmp_path: Path) -> None:
    edge_dir, edge_inputs, edge_want = edge_artifact(toy_config(lora_r=4, lora_alpha=16), tmp_path)
    doc = json.loads((edge_dir / CONFIG_FILE).read_text())
    assert (doc["r"], doc["lora_alpha"]) == (4, 16) and (edge_dir / PERSONAL_FILE).exists()

    # a real global: two real uploads from trained edges through the real core, fedavg over both
    state = tmp_path / "cloud"
    cfg = cloud_config(state, BrokerAddress("127.0.0.1", 1), aggregation={"buffer_k": 2, "strategy": "fedavg"})
    core = AggregatorCore(cfg)
    try:
        for n, site in enumerate(("a", "b")):
            trainer = Trainer(model_config(4), device="cpu")
            for sample in ToyTask(model_config(4), seed=10 + n).samples(32):
                trainer.add_sample(sample)
            trainer.train_round(steps=2, batch_size=16)
            tensors = {k: v.numpy() for k, v in trainer.shared_state().items()}
            core.ingest(topics.adapter_up(site), update_payload(
                tensors, site=site, seq=1, base_version=0, fingerprint=base_fingerprint(model_config(4)), rank=4))
        assert core.version == 1, core.metrics()
        glob = {k: torch.from_numpy(v.copy()) for k, v in core.glob.tensors.items()}  # the cloud holds numpy
    finally:
        core.close()
    (tmp_path / "cloud.toml").write_text(dumps_cloud_config(cfg))
    out = tmp_path / "global-v1"
    result = CliRunner().invoke(app, ["export-global", "-c", str(tmp_path / "cloud.toml"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    rank = int(next(v for k, v in glob.items() if k.endswith("lora_A.weight")).shape[0])
    doc = json.loads((out / CONFIG_FILE).read_text())
    assert (doc["r"], doc["lora_alpha"], doc["rank_pattern"]) == (rank, rank, {})
    assert json.loads((out / "megace.json").read_text())["version"] == 1
    g_config = model_config(rank)
    g_model = installed_like_an_edge(glob, g_config)
    g_batch = collate(ToyTask(g_config, seed=7).samples(12), g_config, with_labels=False)
    g_inputs, g_want = save_inputs(g_batch, tmp_path / "global-inputs.safetensors"), logits_of(g_model, g_batch)

    # the artifacts as exported before: no adapter_config; the edge's config (alpha = 2r); no personal part
    bare, doubled, impersonal = (tmp_path / n for n in ("old-bare", "old-doubled", "old-impersonal"))
    bare.mkdir()
    for name in (WEIGHTS_FILE, "megace.json"):  # megace.json too: the old layout fails in peft, not in the builder
        shutil.copy(out / name, bare / name)
    shutil.copytree(out, doubled)
    (doubled / CONFIG_FILE).write_text(json.dumps({**doc, "lora_alpha": 2 * rank}))
    shutil.copytree(edge_dir, impersonal)
    (impersonal / PERSONAL_FILE).unlink()

    got = load_with_plain_peft([(edge_dir, edge_inputs), (out, g_inputs), (bare, g_inputs), (doubled, g_inputs),
                                (impersonal, edge_inputs)], tmp_path)
    print(f"edge max|Δ| {max_diff(got[edge_dir], edge_want):.2e}, global max|Δ| {max_diff(got[out], g_want):.2e}")
    assert max_diff(got[edge_dir], edge_want) < TOL, got[edge_dir]
    assert max_diff(got[out], g_want) < TOL, got[out]
    assert max_diff(got[bare], g_want) > TOL and "adapter_config" in str(got[bare])
    assert max_diff(got[doubled], g_want) > 100 * TOL
    assert max_diff(got[impersonal], edge_want) > 100 * TOL


def test_minilm_edge_and_global_artifacts_load_with_plain_peft(tmp_path: Path) -> None:
    """The same for the bundled MiniLM backbone (loaded by plain ``transformers``, ~15 s); the global here is
    the trained edge's adapter folded to scaling 1 as the cloud stores it (no core: its bootstrap is slow)."""
    config = toy_config(backbone="minilm", lora_r=4, lora_alpha=8)
    edge_dir, edge_inputs, edge_want = edge_artifact(config, tmp_path)
    shared = load_file(str(edge_dir / WEIGHTS_FILE))
    glob = {k: (v * lora_scaling(8, 4) if is_lora_b(k) else v) for k, v in shared.items()}
    out = export_global(glob, config, tmp_path / "global", version=1)
    batch = collate(ToyTask(config, seed=7).samples(12), config, with_labels=False)
    g_inputs = save_inputs(batch, tmp_path / "g.safetensors")
    g_want = logits_of(installed_like_an_edge(glob, config), batch)
    got = load_with_plain_peft([(edge_dir, edge_inputs), (out, g_inputs)], tmp_path)
    print(f"minilm edge max|Δ| {max_diff(got[edge_dir], edge_want):.2e}, global {max_diff(got[out], g_want):.2e}")
    assert max_diff(got[edge_dir], edge_want) < TOL, got[edge_dir]
    assert max_diff(got[out], g_want) < TOL, got[out]
