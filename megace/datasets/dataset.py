"""The common in-memory shape of every megace dataset.

A sample is what one simulated device publishes: a dict with ``"modalities"`` (modality name ->
float32 array of shape ``(tokens, token_dim)``), an integer ``"label"``, a unique ``"id"`` and the
``"source"`` it was derived from (the real recording / image / utterance).  ``source`` is what split
helpers group on, so augmented copies of one recording never land on both sides of a split.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Sample = dict[str, Any]


@dataclass(frozen=True)
class ModalitySpec:
    """Fixed token layout of one modality: every sample carries a ``(tokens, token_dim)`` float32 array."""

    token_dim: int
    tokens: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.tokens, self.token_dim)


@dataclass
class MultimodalDataset:
    """A list of samples plus the schema (modalities, classes) needed to build a model for them."""

    name: str
    modalities: dict[str, ModalitySpec]
    classes: list[str]
    samples: list[Sample]
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    @property
    def labels(self) -> np.ndarray:
        return np.fromiter((s["label"] for s in self.samples), dtype=np.int64, count=len(self.samples))

    def class_counts(self) -> np.ndarray:
        """Samples per class, indexed like ``classes``."""
        return np.bincount(self.labels, minlength=len(self.classes))

    def stack(self, modality: str) -> np.ndarray:
        """All samples' features of one modality as ``(n, tokens, token_dim)`` (for baselines and batching)."""
        spec = self.modalities[modality]
        if not self.samples:
            return np.zeros((0, *spec.shape), dtype=np.float32)
        return np.stack([s["modalities"][modality] for s in self.samples])

    def subset(self, indices: Iterable[int], name: str | None = None) -> MultimodalDataset:
        """A view-like copy holding the given samples (the sample dicts are shared, not copied)."""
        return MultimodalDataset(
            name=name or self.name,
            modalities=dict(self.modalities),
            classes=list(self.classes),
            samples=[self.samples[int(i)] for i in indices],
            info=dict(self.info),
        )

    def with_modalities(self, names: Sequence[str]) -> MultimodalDataset:
        """A copy whose samples carry only ``names`` — what an edge that only has those sensors sees."""
        unknown = set(names) - set(self.modalities)
        if unknown:
            raise KeyError(f"{self.name} has no modalities {sorted(unknown)}; it has {sorted(self.modalities)}")
        keep = [m for m in self.modalities if m in names]
        samples = [{**s, "modalities": {m: s["modalities"][m] for m in keep}} for s in self.samples]
        return MultimodalDataset(
            name=self.name,
            modalities={m: self.modalities[m] for m in keep},
            classes=list(self.classes),
            samples=samples,
            info=dict(self.info),
        )

    def validate(self) -> None:
        """Raise ``ValueError`` if any sample breaks the schema (wrong shape/dtype, non-finite, bad label)."""
        n_classes = len(self.classes)
        for i, s in enumerate(self.samples):
            if set(s["modalities"]) != set(self.modalities):
                raise ValueError(f"sample {i}: modalities {sorted(s['modalities'])} != {sorted(self.modalities)}")
            for m, spec in self.modalities.items():
                a = s["modalities"][m]
                if a.dtype != np.float32 or a.shape != spec.shape:
                    raise ValueError(f"sample {i} {m}: {a.dtype}{a.shape}, expected float32{spec.shape}")
                if not np.isfinite(a).all():
                    raise ValueError(f"sample {i} {m}: non-finite values")
            if not 0 <= int(s["label"]) < n_classes:
                raise ValueError(f"sample {i}: label {s['label']} outside 0..{n_classes - 1}")
