"""The frozen base the cloud serves: its fingerprint, the adapter schema, and version 0.

Version 0 of the global is the seeded initial shared adapter (``build_edge_model`` seeds LoRA
under the config seed, so every edge starts from the same one).  Building it needs peft,
transformers and the whole base, so it is built only when the ledger is empty, and then in a
short-lived child process (``bootstrap``) that writes ``initial.safetensors`` and
``reference.json`` into the state directory: the service itself only reads them, and never
imports peft or holds the base.  The schema and fingerprint in ``reference.json`` let a restart
skip the model entirely, and keep a state directory from being silently reused with another base.

The same file keeps two scales the poisoning guards judge uploads by from the very first one:
``base_norm`` (Frobenius norm of the frozen weights the adapter modifies: the absolute norm
bound is a multiple of it) and ``a_rms`` (each module's LoRA A row scale at version 0: A is
what every edge starts from and barely rescales, so it pins the factor gauge; see ``balance.py``).
A reference file from before these fields existed is completed once, by building again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megace_model.config import EdgeModelConfig
from megace_model.fingerprint import base_fingerprint

from .bootstrap import INITIAL_FILE, REFERENCE_FILE, a_row_scales, build, run_bootstrap
from .validation import AdapterSchema

__all__ = [
    "INITIAL_FILE",
    "REFERENCE_FILE",
    "Reference",
    "StateMismatch",
    "a_row_scales",
    "initial_adapter",
    "open_reference",
]


class StateMismatch(RuntimeError):
    """The state directory belongs to another frozen base than the configured one."""


@dataclass(frozen=True)
class Reference:
    fingerprint: str
    schema: AdapterSchema
    #: ||W0||_F over every module the adapter modifies
    base_norm: float = 0.0
    #: per module: RMS row norm of the initial LoRA A, ||A0||_F / sqrt(r)
    a_rms: dict[str, float] = field(default_factory=dict)


def initial_adapter(model: EdgeModelConfig) -> dict[str, np.ndarray]:
    """The seeded shared adapter at the global's scaling 1 (``alpha/r`` folded into B), built in-process (torch)."""
    return {k: t.detach().cpu().numpy() for k, t in build(model)[0].items()}


def _read(state_dir: Path, fingerprint: str) -> dict | None:
    """``reference.json`` if present; ``StateMismatch`` if it describes another base."""
    path = state_dir / REFERENCE_FILE
    if not path.exists():
        return None
    doc = json.loads(path.read_text())
    if doc.get("fingerprint") != fingerprint:
        raise StateMismatch(
            f"{state_dir} holds state for base {str(doc.get('fingerprint'))[:12]}…, the config describes "
            f"{fingerprint[:12]}…; use another state_dir or restore the matching [model] section"
        )
    return doc


def _initial(state_dir: Path, fingerprint: str) -> dict[str, np.ndarray] | None:
    """Version 0 as the builder wrote it, or None if missing or written for another base."""
    from safetensors import safe_open

    path = state_dir / INITIAL_FILE
    if not path.exists():
        return None
    with safe_open(str(path), framework="np") as f:
        if (f.metadata() or {}).get("fingerprint") != fingerprint:
            return None
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)


def open_reference(
    state_dir: Path, model: EdgeModelConfig, *, need_initial: bool, isolate: bool | None = None
) -> tuple[Reference, dict[str, np.ndarray] | None]:
    """Load ``reference.json`` (and version 0 when ``need_initial``), building them first if missing.

    ``isolate`` picks where a build runs (see ``bootstrap.run_bootstrap``; None: in a child unless
    this process has already imported peft).
    """
    fingerprint = base_fingerprint(model)
    doc = _read(state_dir, fingerprint)
    complete = doc is not None and "base_norm" in doc and "a_rms" in doc
    initial = _initial(state_dir, fingerprint) if complete and need_initial else None
    if not complete or (need_initial and initial is None):
        run_bootstrap(state_dir, model, isolate=isolate)
        doc = _read(state_dir, fingerprint)
        initial = _initial(state_dir, fingerprint) if need_initial else None
        if doc is None or (need_initial and initial is None):
            raise RuntimeError(f"the version-0 builder left no usable {REFERENCE_FILE}/{INITIAL_FILE} in {state_dir}")
    assert doc is not None
    schema = AdapterSchema(
        modules={m: (int(o), int(i)) for m, (o, i) in doc["modules"].items()},
        extras={n: tuple(int(d) for d in s) for n, s in doc["extras"].items()},
    )
    a_rms = {m: float(v) for m, v in doc["a_rms"].items()}
    return Reference(fingerprint, schema, float(doc["base_norm"]), a_rms), initial
