"""A small synthetic multimodal task that is learnable in a few dozen steps.

Used by tests, smoke runs of the service and benchmarks: each class has a
prototype per modality; samples are noisy prototypes with random modalities
missing, so only a model that fuses whatever is present does well.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from megace_model.config import EdgeModelConfig, ModalitySpec


def toy_config(**overrides: Any) -> EdgeModelConfig:
    """Two modalities: ``imu`` (up to 4 tokens of 6 dims) and ``env`` (1 token of 8 dims), 4 classes."""
    fields: dict[str, Any] = {
        "modalities": {"imu": ModalitySpec(token_dim=6, max_tokens=4), "env": ModalitySpec(token_dim=8)},
        "num_classes": 4,
        "backbone": "tiny",
    }
    fields.update(overrides)
    return EdgeModelConfig(**fields)


@dataclass
class ToyTask:
    """Generator of samples ``{"modalities": ..., "label": ...}`` for a config."""

    config: EdgeModelConfig
    seed: int = 0
    noise: float = 0.8
    keep_prob: float = 0.7
    prototypes: dict[str, np.ndarray] = field(init=False)

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        self.prototypes = {
            name: rng.normal(size=(self.config.num_classes, spec.token_dim)).astype(np.float32)
            for name, spec in sorted(self.config.modalities.items())
        }
        self._rng = np.random.default_rng(self.seed + 1)

    def sample(self, label: int | None = None, modalities: tuple[str, ...] | None = None) -> dict[str, Any]:
        """One sample; by default a random label and a random non-empty modality subset."""
        rng = self._rng
        y = int(rng.integers(self.config.num_classes)) if label is None else label
        names = self.config.modality_names
        if modalities is None:
            keep = [n for n in names if rng.random() < self.keep_prob] or [names[int(rng.integers(len(names)))]]
        else:
            keep = list(modalities)
        out: dict[str, np.ndarray] = {}
        for name in keep:
            spec = self.config.modalities[name]
            tokens = int(rng.integers(1, spec.max_tokens + 1))
            noise = rng.normal(scale=self.noise, size=(tokens, spec.token_dim))
            out[name] = (self.prototypes[name][y] + noise).astype(np.float32)
        return {"modalities": out, "label": y}

    def samples(self, n: int, **kwargs: Any) -> list[dict[str, Any]]:
        return [self.sample(**kwargs) for _ in range(n)]
