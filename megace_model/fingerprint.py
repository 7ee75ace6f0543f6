"""Fingerprint of the frozen base, so adapters trained on another base are rejected.

Two nodes whose fingerprints agree build bit-identical frozen weights: the
fingerprint covers everything the frozen part is a function of (backbone kind
and its weights file, modality token dims and sequence layout, hidden size,
seed, and a format version bumped whenever the construction code changes).
Personal-only knobs (num_classes, contrastive settings) and LoRA settings are
left out: LoRA shapes are checked tensor by tensor on load instead.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from typing import TYPE_CHECKING

from megace_model.config import EdgeModelConfig

if TYPE_CHECKING:  # torch only where frozen weights are hashed: the cloud service fingerprints without it
    from torch import nn

#: Bump when the way the frozen base is built changes.
BASE_FORMAT_VERSION = 1


@lru_cache(maxsize=8)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a weights file; cached per (path, size, mtime) since MiniLM is 91 MB."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _backbone_identity(config: EdgeModelConfig) -> str:
    if config.backbone == "tiny":
        return "tiny-bert-128x2"
    from megace_model.weights import minilm_path  # not backbone: that imports transformers

    weights = minilm_path() / "model.safetensors"
    stat = weights.stat()
    return "minilm:" + _file_digest(str(weights), stat.st_size, stat.st_mtime_ns)


def base_fingerprint(config: EdgeModelConfig) -> str:
    """Hex sha256 identifying the frozen base defined by ``config``."""
    payload = {
        "format": BASE_FORMAT_VERSION,
        "backbone": _backbone_identity(config),
        "hidden": config.hidden_size,
        "seed": config.seed,
        "modalities": [
            [name, config.modalities[name].token_dim, config.modalities[name].max_tokens]
            for name in config.modality_names
        ],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def frozen_weights_digest(model: nn.Module) -> str:
    """sha256 over the actual frozen tensors (name, shape, bytes); slower, for tests and audits."""
    import torch

    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        if param.requires_grad:
            continue
        digest.update(name.encode())
        digest.update(str(tuple(param.shape)).encode())
        digest.update(param.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()
