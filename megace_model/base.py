"""The public base builder: the frozen multimodal model every megace adapter is made for.

Why public: an exported adapter (the edge's ``state/adapter/``, a global written by
``megace export-global``) is a plain peft directory, but peft needs the model it was made for.
This is the one documented function that builds it, so users do not depend on megace internals::

    from peft import PeftModel
    from megace_model import build_base

    model = PeftModel.from_pretrained(build_base("state/adapter"), "state/adapter")
    logits = model(features=..., token_mask=..., presence=...).logits

What it builds is ``build_base_model`` (the very model the edge wraps with LoRA): ``backbone``
(a plain ``transformers.BertModel``: seeded tiny BERT, or the bundled MiniLM loaded with
``BertModel.from_pretrained``), the seeded ``modality_proj.<m>`` projections, and the personal
part (embeddings, CLS token, cross-modal block, ``head``) whose output is class logits. The frozen
weights are a function of the config alone (see ``fingerprint``), so the module names are exactly
the ones the adapters target.

The personal part travels as ``megace_personal.safetensors`` in the artifact and is loaded here,
not through peft's ``modules_to_save``: two of its parameters (``cls_token``, ``modality_embed``)
are bare parameters of the root module and ``position_embed`` is a ``ParameterDict`` that the model
indexes, none of which ``ModulesToSaveWrapper`` can wrap; and keeping personal weights out of
peft's state dict is what keeps them out of every upload (see ``adapters``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from megace_model.adapters import build_base_model
from megace_model.classifier import PERSONAL_MODULES, MultimodalClassifier
from megace_model.config import EdgeModelConfig
from megace_model.errors import AdapterMismatchError, BaseMismatchError
from megace_model.fingerprint import base_fingerprint

META_FILE = "megace.json"
"""megace's metadata next to peft's files: kind, model config, base fingerprint, builder."""
LEGACY_META_FILE = "megace_edge.json"
"""Where edge exports kept the same metadata before globals were exported too."""
PERSONAL_FILE = "megace_personal.safetensors"
"""The personal (never uploaded) weights of the edge whose artifact it is, un-prefixed names."""
BUILDER = "megace_model.build_base"
"""Named in every artifact's metadata: the function that rebuilds its base."""

Source = EdgeModelConfig | Mapping[str, Any] | str | os.PathLike[str]


def read_meta(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """An artifact's megace metadata (``AdapterMismatchError`` if absent or unreadable)."""
    root = Path(directory)
    for name in (META_FILE, LEGACY_META_FILE):
        path = root / name
        if path.exists():
            try:
                meta = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise AdapterMismatchError(f"unreadable {path}: {exc}") from exc
            if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
                raise AdapterMismatchError(f"{path}: no model config")
            return meta
    raise AdapterMismatchError(f"{root} holds no {META_FILE}: not a megace artifact")


def artifact_config(directory: str | os.PathLike[str]) -> EdgeModelConfig:
    """The model config an artifact was made with; its fingerprint must match this installation's base."""
    meta = read_meta(directory)
    config = EdgeModelConfig.from_dict(meta["config"])
    expected = meta.get("base_fingerprint")
    if expected is not None and expected != base_fingerprint(config):
        raise BaseMismatchError(f"{directory} was made for base {str(expected)[:12]}..., this installation "
                                f"builds {base_fingerprint(config)[:12]}... (other backbone weights?)")
    return config


def build_base(source: Source, *, personal: bool = True) -> MultimodalClassifier:
    """The frozen base for ``PeftModel.from_pretrained``, in eval mode, every parameter frozen.

    ``source`` is an artifact directory (its config is read from ``megace.json`` and, with
    ``personal``, its ``megace_personal.safetensors`` is loaded so the model gives that edge's
    predictions), an ``EdgeModelConfig`` or its ``to_dict()`` form (seeded personal part).
    ``forward(features, token_mask, presence)`` returns an output whose ``.logits`` are the classes.
    """
    directory: Path | None = None
    if isinstance(source, EdgeModelConfig):
        config = source
    elif isinstance(source, Mapping):
        config = EdgeModelConfig.from_dict(dict(source))
    else:
        directory = Path(source)
        config = artifact_config(directory)
    model = build_base_model(config)
    if directory is not None and personal and (directory / PERSONAL_FILE).exists():
        load_personal_file(model, directory / PERSONAL_FILE)
    for param in model.parameters():
        param.requires_grad_(False)
    return model.eval()


def load_personal_file(model: MultimodalClassifier, path: Path) -> None:
    """Copy the personal weights in ``path`` into ``model``; only personal names, shapes as they replace
    (an artifact must never overwrite the frozen base it is checked against)."""
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise AdapterMismatchError(f"cannot read {path}: {exc}") from exc
    params = dict(model.named_parameters())
    for name, value in tensors.items():
        target = params.get(name)
        if name.split(".", 1)[0] not in PERSONAL_MODULES or target is None or tuple(target.shape) != tuple(value.shape):
            raise AdapterMismatchError(f"{path}: {name} {tuple(value.shape)} does not fit this base")
        if not torch.isfinite(value).all():
            raise AdapterMismatchError(f"{path}: {name} holds NaN or infinite values")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].dtype))


__all__ = ["BUILDER", "META_FILE", "PERSONAL_FILE", "artifact_config", "build_base", "read_meta"]
