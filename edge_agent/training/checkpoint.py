"""On-disk checkpoint format: ``checkpoint.safetensors`` + ``checkpoint.json``.

The JSON is written last and carries the sha256 of the tensor file, so a crash
between the two writes, a truncated file or bit rot is detected on load and
reported as ``CheckpointError`` instead of loading garbage. Each file is
written to a temporary name, fsynced and renamed (atomic on POSIX).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from megace_common.durable import atomic_write
from megace_model.errors import CheckpointError

FORMAT_VERSION = 1
TENSORS_FILE = "checkpoint.safetensors"
META_FILE = "checkpoint.json"


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()



def write_checkpoint(directory: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write tensors + JSON metadata into ``directory`` (created if needed)."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    tensor_path = path / TENSORS_FILE
    atomic_write(tensor_path, save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}))
    body = {"format": FORMAT_VERSION, "sha256": _sha256(tensor_path), "meta": meta}
    atomic_write(path / META_FILE, json.dumps(body, indent=2, sort_keys=True).encode())
    return path


def read_checkpoint(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return ``(tensors, meta)``; any missing/corrupt/mismatched file raises ``CheckpointError``."""
    path = Path(directory)
    try:
        body = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"unreadable {path / META_FILE}: {exc}") from exc
    if not isinstance(body, dict) or body.get("format") != FORMAT_VERSION or "meta" not in body:
        raise CheckpointError(f"{path / META_FILE}: unknown checkpoint format")
    tensor_path = path / TENSORS_FILE
    try:
        actual = _sha256(tensor_path)
    except OSError as exc:
        raise CheckpointError(f"unreadable {tensor_path}: {exc}") from exc
    if actual != body.get("sha256"):
        raise CheckpointError(f"{tensor_path}: checksum mismatch (truncated or corrupt)")
    try:
        tensors = load_file(str(tensor_path))
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"cannot parse {tensor_path}: {exc}") from exc
    return tensors, body["meta"]
