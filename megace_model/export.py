"""Export / import adapters as peft directories that plain ``peft`` loads onto :func:`build_base`.

Every artifact holds, next to each other:

* ``adapter_config.json`` + ``adapter_model.safetensors``: peft's own files, so
  ``PeftModel.from_pretrained(build_base(path), path)`` loads it with rank, alpha and target
  modules as made (the edge's ``r``/``lora_alpha``; a global's rank with ``lora_alpha == r``,
  i.e. scaling 1, since the cloud keeps ``alpha/r`` folded into B);
* ``megace.json``: kind (``edge``/``global``), model config, base fingerprint and the builder's
  name, so a loader refuses an adapter made for another frozen base;
* ``megace_personal.safetensors`` (edge artifacts; a global only if it aggregates personal
  tensors): the personal part, loaded by ``build_base`` so the model gives that edge's predictions.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from megace_common.lora import b_factor, is_lora_b, lora_scaling, rescale_b, split_lora, strip_peft_prefix
from megace_model.adapters import ADAPTER_NAME, apply_global, is_personal, personal_state, shared_state
from megace_model.base import BUILDER, LEGACY_META_FILE, META_FILE, PERSONAL_FILE, artifact_config, read_meta
from megace_model.config import EdgeModelConfig
from megace_model.errors import AdapterMismatchError, BaseMismatchError
from megace_model.fingerprint import base_fingerprint

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


def _write_meta(path: Path, kind: str, config: EdgeModelConfig, **extra: Any) -> None:
    meta = {"kind": kind, "config": config.to_dict(), "base_fingerprint": base_fingerprint(config),
            "builder": BUILDER, **extra}
    (path / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))


def export_shared(model: PeftModel, directory: str | Path) -> Path:
    """The edge's artifact: its shared adapter in peft format, its personal part, and megace's metadata.

    The personal weights go to their own file (never into peft's), so the shared adapter stays
    exactly what is uploaded.
    """
    path = Path(directory)
    model.save_pretrained(str(path), selected_adapters=[ADAPTER_NAME], safe_serialization=True)
    config = model.get_base_model().edge_config
    save_file({k: v.contiguous() for k, v in personal_state(model).items()}, str(path / PERSONAL_FILE))
    _write_meta(path, "edge", config)
    return path


def global_lora_config(tensors: Mapping[str, torch.Tensor]) -> LoraConfig:
    """peft's config for a global at scaling 1: ``lora_alpha == r`` per module, targets read from the tensors.

    The rank is the most common module rank; modules of another rank (flora's stacked form,
    flexlora's numerical rank) get ``rank_pattern``/``alpha_pattern`` entries with the same value.
    """
    ranks: dict[str, int] = {}
    for name, tensor in tensors.items():
        parts = split_lora(name)
        if parts is not None and parts[1] == "A":
            ranks[strip_peft_prefix(parts[0])] = int(tensor.shape[0])
    if not ranks:
        raise AdapterMismatchError("the global holds no LoRA factors")
    values = sorted(ranks.values())
    r = max(set(values), key=values.count)
    pattern = {re.escape(m): k for m, k in sorted(ranks.items()) if k != r}
    return LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, bias="none", target_modules=sorted(ranks),
                      rank_pattern=pattern, alpha_pattern=dict(pattern))


def export_global(
    tensors: Mapping[str, torch.Tensor], config: EdgeModelConfig, directory: str | Path, **meta: Any
) -> Path:
    """Write a global (tensors at scaling 1, canonical peft names) as a peft artifact, replacing ``directory``
    atomically (written beside it, then swapped in). ``meta`` (version, strategy...) goes into ``megace.json``."""
    target = Path(directory)
    fresh, old = target.with_name(target.name + ".new"), target.with_name(target.name + ".old")
    shutil.rmtree(fresh, ignore_errors=True)
    fresh.mkdir(parents=True)
    lora = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items() if split_lora(k) is not None}
    personal = {strip_peft_prefix(k): v.detach().to("cpu").contiguous().clone()
                for k, v in tensors.items() if split_lora(k) is None and is_personal(k)}
    stray = sorted(set(tensors) - set(lora) - {k for k in tensors if is_personal(k)})
    if stray:
        raise AdapterMismatchError(f"global tensors that are neither LoRA nor personal: {stray[:5]}")
    peft_config = global_lora_config(lora)
    peft_config.save_pretrained(str(fresh))
    save_file(lora, str(fresh / WEIGHTS_FILE), metadata={"format": "pt"})
    if personal:
        save_file(personal, str(fresh / PERSONAL_FILE))
    _write_meta(fresh, "global", config, **meta)
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(fresh, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def read_shared(directory: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of an exported adapter, keyed like ``shared_state`` (raises ``AdapterMismatchError``)."""
    weights = Path(directory) / WEIGHTS_FILE
    try:
        return load_file(str(weights))
    except (OSError, SafetensorError) as exc:
        raise AdapterMismatchError(f"cannot read {weights}: {exc}") from exc


def _sent_scaling(directory: Path) -> float | None:
    """``lora_alpha / r`` the artifact was saved at (None without a readable, uniform adapter_config)."""
    try:
        doc = json.loads((directory / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None
    if doc.get("rank_pattern") or doc.get("alpha_pattern") or doc.get("use_rslora"):
        raise AdapterMismatchError(f"{directory}: per-module ranks cannot be imported as one adapter")
    return lora_scaling(float(doc["lora_alpha"]), int(doc["r"]))


def import_shared(model: PeftModel, directory: str | Path) -> None:
    """Check the base fingerprint (if the metadata is present) and apply the adapter as the global one,
    B rescaled from the artifact's ``alpha/r`` to the model's (a global is saved at scaling 1)."""
    path = Path(directory)
    config = model.get_base_model().edge_config
    try:
        meta_fp = read_meta(path).get("base_fingerprint")
    except AdapterMismatchError:
        if any((path / name).exists() for name in (META_FILE, LEGACY_META_FILE)):
            raise
        meta_fp = None
    if meta_fp is not None and meta_fp != base_fingerprint(config):
        raise BaseMismatchError("adapter was exported for a different frozen base")
    tensors = read_shared(path)
    sent, own = _sent_scaling(path), lora_scaling(config.lora_alpha, config.lora_r)
    if sent is not None and not math.isclose(b_factor(sent, own), 1.0):
        tensors = {k: (rescale_b(v.float(), sent, own) if is_lora_b(k) else v) for k, v in tensors.items()}
    apply_global(model, tensors)


__all__ = ["artifact_config", "export_global", "export_shared", "global_lora_config", "import_shared",
           "read_shared", "shared_state"]
