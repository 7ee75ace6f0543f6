"""Durable file writes shared by the edge agent and the cloud aggregator.

A checkpoint or ledger file must be either the old version or the new one after
a crash, never a torn mix, and must still be there after a power cut: write a
temporary file, fsync it, rename it over the target, fsync the directory.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new file in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: str | Path, data: bytes) -> None:
    """Write and fsync a file that no reader sees until something else publishes it."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write(path: str | Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so readers see the old or the new file, never a mix."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write_synced(tmp, data)
    os.replace(tmp, path)
    fsync_dir(path.parent)
