"""Per-component seeded initialisation.

Each component gets its own seed derived from (config seed, component name), so
the frozen base does not depend on how many personal parameters were created
before it (e.g. ``num_classes`` must not change the frozen projections).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def component_seed(seed: int, component: str) -> int:
    """Stable 63-bit seed for one named component."""
    digest = hashlib.sha256(f"{seed}:{component}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@contextmanager
def seeded(seed: int, component: str) -> Iterator[None]:
    """Run the body with torch's CPU RNG seeded for ``component``; restore the caller's RNG afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(component_seed(seed, component))
        yield
