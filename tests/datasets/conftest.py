"""Shared, session-scoped dataset fixtures: each recipe is built once per test run, in a private cache."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from megace.datasets import MultimodalDataset, load_dataset

# Fewer voices than the default keep the first (uncached) build to a few seconds.
AV_OPTIONS = {"n_voices": 12, "renditions": 2}


@pytest.fixture(scope="session")
def av_options() -> dict[str, int]:
    return dict(AV_OPTIONS)


@pytest.fixture(scope="session")
def av_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private ``MEGACE_CACHE`` for the whole session, so tests never touch the user's cache."""
    path = tmp_path_factory.mktemp("megace-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEGACE_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def basicmotions() -> tuple[MultimodalDataset, MultimodalDataset]:
    return load_dataset("basicmotions", seed=0, augment=3)


@pytest.fixture(scope="session")
def digits_av(av_cache: Path) -> tuple[MultimodalDataset, MultimodalDataset]:
    return load_dataset("digits-av", seed=0, **AV_OPTIONS)
