"""Files a gateway keeps (models, extractor bundles): hashed without a second copy in memory, written whole.

One place for both because the model store and the extractors check files against a recorded sha256,
and a gateway that loses power mid-write must find the old file or the new one, never half of one.
Python 3.9-compatible (no ``hashlib.file_digest``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (a MiniLM model is 90 MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """``data`` at ``path`` whole or not at all: a temporary file, fsync'd, renamed over, directory fsync'd."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
