"""Where generated dataset artifacts live: ``$MEGACE_CACHE`` or ``~/.cache/megace``.

Generation is deterministic, so the cache is only a speed-up; deleting it is always safe.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "MEGACE_CACHE"


def cache_dir(*parts: str) -> Path:
    """The (created) cache folder for ``parts``, e.g. ``cache_dir("digits-av", "wav")``."""
    root = Path(os.environ.get(ENV_VAR) or Path.home() / ".cache" / "megace")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
