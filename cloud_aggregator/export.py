"""Export a global from the ledger as a peft artifact: ``python -m cloud_aggregator.export`` / ``megace export-global``.

The ledger keeps globals as bare safetensors at scaling 1 (``alpha/r`` folded into B, see
``contribution``); the artifact adds peft's ``adapter_config.json`` (``lora_alpha == r``) and
megace's metadata, so ``PeftModel.from_pretrained(build_base(path), path)`` applies exactly the
global's ``ΔW``. Reads the ledger database read-only and never opens a :class:`Ledger`, whose
start-up clean-up would race a running service's writes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sqlite3
import sys
from pathlib import Path

from megace_model.config import EdgeModelConfig
from megace_model.fingerprint import base_fingerprint

from .bootstrap import REFERENCE_FILE
from .config import load_cloud_config


class ExportError(RuntimeError):
    """The requested global cannot be exported (unknown or pruned version, state of another base)."""


def _row(state_dir: Path, version: int | None) -> tuple[int, str, str, str]:
    db_path = state_dir / "ledger.sqlite"
    if not db_path.exists():
        raise ExportError(f"{state_dir} holds no ledger")
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        select = "SELECT version, strategy, path, meta FROM globals"
        if version is None:
            row = db.execute(f"{select} ORDER BY version DESC LIMIT 1").fetchone()
        else:
            row = db.execute(f"{select} WHERE version=?", (version,)).fetchone()
    finally:
        db.close()
    if row is None:
        raise ExportError(f"no global {'at all' if version is None else f'v{version}'} in {state_dir}")
    if not row[2]:
        raise ExportError(f"global v{row[0]} was pruned from {state_dir} (its tensors are gone)")
    return int(row[0]), str(row[1]), str(row[2]), str(row[3])


def export_global_version(state_dir: str | Path, model: EdgeModelConfig, out: str | Path,
                          version: int | None = None) -> Path:
    """Write global ``version`` (default: the latest) of the ledger in ``state_dir`` to ``out`` as a peft artifact.

    ``model`` is the cloud's ``[model]`` section; the state directory must describe the same base.
    torch and peft are imported here, on use: the module stays importable without them.
    """
    from safetensors.torch import load_file

    from megace_model.export import export_global, global_lora_config

    root = Path(state_dir)
    reference = root / REFERENCE_FILE
    if reference.exists() and json.loads(reference.read_text()).get("fingerprint") != base_fingerprint(model):
        raise ExportError(f"{root} holds state for another frozen base than the configured [model]")
    number, strategy, rel, meta = _row(root, version)
    tensors = load_file(root / rel)
    rank = global_lora_config(tensors).r
    config = dataclasses.replace(model, lora_r=rank, lora_alpha=rank)  # as the adapter_config says: scaling 1
    contributors = json.loads(meta).get("contributors", [])
    return export_global(tensors, config, out, version=number, strategy=strategy, contributors=contributors)


def main(argv: list[str] | None = None) -> int:
    """``python -m cloud_aggregator.export --config cloud.toml [--state-dir DIR] [--version N] --out PATH``."""
    parser = argparse.ArgumentParser(prog="python -m cloud_aggregator.export", description=__doc__.splitlines()[0])
    parser.add_argument("--config", "-c", required=True, help="the cloud's TOML file (its [model] and state_dir)")
    parser.add_argument("--state-dir", help="override the config's state_dir")
    parser.add_argument("--version", type=int, help="global version (default: the latest)")
    parser.add_argument("--out", required=True, help="artifact directory to write (replaced atomically)")
    args = parser.parse_args(argv)
    config = load_cloud_config(args.config)
    try:
        path = export_global_version(args.state_dir or config.state_dir, config.model, args.out, args.version)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
