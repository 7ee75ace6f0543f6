"""Dataset names -> loaders, and the one entry point ``load_dataset``.

Loaders are imported lazily so ``import megace.datasets`` stays numpy-only (no sktime/sklearn start-up cost).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from megace.datasets.dataset import MultimodalDataset
from megace.datasets.splits import stratified_cap

Loader = Callable[..., tuple[MultimodalDataset, MultimodalDataset]]

# name -> "module:function"; each function takes keyword-only ``seed`` plus recipe options.
DATASETS: dict[str, str] = {
    "basicmotions": "megace.datasets.basicmotions:load_basicmotions",
    "digits-av": "megace.datasets.digits_av:load_digits_av",
    "mnist-av": "megace.datasets.mnist_av:load_mnist_av",
}


def register(name: str, target: str) -> None:
    """Add a loader given as ``"module:function"`` (experiments can plug in their own recipes)."""
    if name in DATASETS and DATASETS[name] != target:
        raise ValueError(f"dataset {name!r} is already registered as {DATASETS[name]}")
    DATASETS[name] = target


def available() -> list[str]:
    return sorted(DATASETS)


def _loader(name: str) -> Loader:
    try:
        module, func = DATASETS[name].split(":")
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(available())}") from None
    return getattr(importlib.import_module(module), func)


def load_dataset(
    name: str, *, seed: int = 0, max_samples: int | None = None, **options: Any
) -> tuple[MultimodalDataset, MultimodalDataset]:
    """``(train, test)`` of a registered dataset; ``options`` go to its recipe (e.g. ``augment=5``).

    ``max_samples`` caps train + test together, keeping their ratio and the class proportions (for quick runs).
    """
    train, test = _loader(name)(seed=seed, **options)
    if max_samples is not None and max_samples < len(train) + len(test):
        n_test = max(1, round(max_samples * len(test) / (len(train) + len(test))))
        train = stratified_cap(train, max(1, max_samples - n_test), seed)
        test = stratified_cap(test, n_test, seed + 1)
    return train, test
