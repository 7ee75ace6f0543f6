"""Collation: a list of samples -> fixed-shape padded tensors + masks.

A sample is ``{"modalities": {name: ndarray}, "label": int}``; each array is
``(tokens, token_dim)`` or ``(token_dim,)`` (one token). Absent modalities are
simply missing from the dict. Shapes are padded to ``max_tokens`` so every batch
has the same shape (no recompilation, predictable memory on small edge boxes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from megace_model.config import EdgeModelConfig
from megace_model.errors import SampleError


@dataclass
class Batch:
    """Model inputs; ``labels`` is None for unlabeled (prediction) batches."""

    features: dict[str, torch.Tensor]
    token_mask: dict[str, torch.Tensor]
    presence: torch.Tensor
    labels: torch.Tensor | None

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            features={k: v.to(device) for k, v in self.features.items()},
            token_mask={k: v.to(device) for k, v in self.token_mask.items()},
            presence=self.presence.to(device),
            labels=None if self.labels is None else self.labels.to(device),
        )

    def model_inputs(self) -> dict[str, Any]:
        """Keyword arguments for ``MultimodalClassifier.forward`` (also through a PeftModel)."""
        return {"features": self.features, "token_mask": self.token_mask, "presence": self.presence}


def as_tokens(name: str, array: Any, token_dim: int, max_tokens: int) -> np.ndarray:
    """Validate one modality array and return it as float32 ``(tokens <= max_tokens, token_dim)``.

    Longer sequences keep their *last* ``max_tokens`` tokens (the most recent readings).
    """
    arr = np.asarray(array, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != token_dim:
        raise SampleError(f"modality {name!r}: expected shape (tokens, {token_dim}) or ({token_dim},), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise SampleError(f"modality {name!r}: non-finite values")
    return arr[-max_tokens:]


def validate_sample(sample: Mapping[str, Any], config: EdgeModelConfig, *, need_label: bool) -> None:
    """Raise ``SampleError`` if ``sample`` could not be collated."""
    if not isinstance(sample, Mapping) or not isinstance(sample.get("modalities"), Mapping):
        raise SampleError("sample must be a mapping with a 'modalities' mapping")
    unknown = set(sample["modalities"]) - set(config.modalities)
    if unknown:
        raise SampleError(f"unknown modalities {sorted(unknown)}")
    for name, array in sample["modalities"].items():
        spec = config.modalities[name]
        as_tokens(name, array, spec.token_dim, spec.max_tokens)
    if need_label:
        label = sample.get("label")
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
            raise SampleError(f"label must be an int, got {label!r}")
        if not 0 <= int(label) < config.num_classes:
            raise SampleError(f"label {label} outside [0, {config.num_classes})")


def collate(samples: Sequence[Mapping[str, Any]], config: EdgeModelConfig, *, with_labels: bool = True) -> Batch:
    """Pad samples into a ``Batch``; raises ``SampleError`` on the first bad sample."""
    if not samples:
        raise SampleError("cannot collate an empty list")
    names = config.modality_names
    n = len(samples)
    features: dict[str, torch.Tensor] = {}
    token_mask: dict[str, torch.Tensor] = {}
    presence = torch.zeros(n, len(names), dtype=torch.bool)
    for sample in samples:
        validate_sample(sample, config, need_label=with_labels)
    for j, name in enumerate(names):
        spec = config.modalities[name]
        feat = np.zeros((n, spec.max_tokens, spec.token_dim), dtype=np.float32)
        mask = np.zeros((n, spec.max_tokens), dtype=bool)
        for i, sample in enumerate(samples):
            array = sample["modalities"].get(name)
            if array is None:
                continue
            toks = as_tokens(name, array, spec.token_dim, spec.max_tokens)
            feat[i, : len(toks)] = toks
            mask[i, : len(toks)] = True
            presence[i, j] = len(toks) > 0
        features[name] = torch.from_numpy(feat)
        token_mask[name] = torch.from_numpy(mask)
    labels = torch.tensor([int(s["label"]) for s in samples], dtype=torch.long) if with_labels else None
    return Batch(features=features, token_mask=token_mask, presence=presence, labels=labels)
