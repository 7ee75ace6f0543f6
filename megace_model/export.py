"""Export / import the shared adapter as a normal peft adapter directory.

The directory holds ``adapter_config.json`` + ``adapter_model.safetensors``
(loadable by ``PeftModel.from_pretrained(build_base_model(config), path)``)
plus ``megace_edge.json`` with the model config and base fingerprint, so an
importer can refuse an adapter made for another frozen base.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel
from safetensors import SafetensorError
from safetensors.torch import load_file

from megace_model.adapters import ADAPTER_NAME, apply_global, shared_state
from megace_model.errors import AdapterMismatchError, BaseMismatchError
from megace_model.fingerprint import base_fingerprint

META_FILE = "megace_edge.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def export_shared(model: PeftModel, directory: str | Path) -> Path:
    """Write the shared adapter in peft format (personal weights are never part of it)."""
    path = Path(directory)
    model.save_pretrained(str(path), selected_adapters=[ADAPTER_NAME], safe_serialization=True)
    config = model.get_base_model().edge_config
    meta = {"config": config.to_dict(), "base_fingerprint": base_fingerprint(config)}
    (path / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return path


def read_shared(directory: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of an exported adapter, keyed like ``shared_state`` (raises ``AdapterMismatchError``)."""
    weights = Path(directory) / WEIGHTS_FILE
    try:
        return load_file(str(weights))
    except (OSError, SafetensorError) as exc:
        raise AdapterMismatchError(f"cannot read {weights}: {exc}") from exc


def import_shared(model: PeftModel, directory: str | Path) -> None:
    """Check the base fingerprint (if the metadata is present) and apply the adapter as the global one."""
    config = model.get_base_model().edge_config
    meta_path = Path(directory) / META_FILE
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as exc:
            raise AdapterMismatchError(f"unreadable {meta_path}: {exc}") from exc
        if meta.get("base_fingerprint") != base_fingerprint(config):
            raise BaseMismatchError("adapter was exported for a different frozen base")
    apply_global(model, read_shared(directory))


__all__ = ["export_shared", "import_shared", "read_shared", "shared_state"]
