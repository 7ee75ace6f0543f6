"""The frozen base the cloud serves: its fingerprint, the adapter schema, and version 0.

Version 0 of the global is the seeded initial shared adapter (``build_edge_model`` seeds LoRA
under the config seed, so every edge starts from the same one).  Building it needs peft
(~6 s to import), so it is built only when the ledger is empty; the schema and fingerprint
are kept in ``reference.json`` so that a restart skips the model entirely, and so that a
state directory can never be silently reused with a different base.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from megace_common.durable import atomic_write
from megace_common.lora import add_peft_prefix, is_lora_b, lora_scaling, rescale_b
from megace_model.config import EdgeModelConfig
from megace_model.fingerprint import base_fingerprint

from .validation import AdapterSchema

REFERENCE_FILE = "reference.json"


class StateMismatch(RuntimeError):
    """The state directory belongs to another frozen base than the configured one."""


@dataclass(frozen=True)
class Reference:
    fingerprint: str
    schema: AdapterSchema


def initial_adapter(model: EdgeModelConfig) -> dict[str, torch.Tensor]:
    """The seeded shared adapter at the global's scaling 1 (``alpha/r`` folded into B)."""
    from megace_model.adapters import build_edge_model, shared_state  # lazy: pulls peft

    edge = lora_scaling(model.lora_alpha, model.lora_r)
    return {name: rescale_b(t, edge, 1.0) if is_lora_b(name) else t
            for name, t in shared_state(build_edge_model(model), dtype=torch.float32).items()}


def personal_shapes(model: EdgeModelConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of an edge's personal tensors as a ``share_personal`` edge uploads them.

    Accepting them lets the no-personalization baselines (FedIT, full-model FedAvg) run through the
    same cloud; the strategies plain-average such non-LoRA tensors.
    """
    from megace_model.adapters import build_edge_model, personal_state  # lazy: pulls peft

    return {add_peft_prefix(n): tuple(t.shape) for n, t in personal_state(build_edge_model(model)).items()}


def open_reference(
    state_dir: Path, model: EdgeModelConfig, *, need_initial: bool
) -> tuple[Reference, dict[str, torch.Tensor] | None]:
    """Load or create ``reference.json``; also build version 0 when ``need_initial``."""
    path = state_dir / REFERENCE_FILE
    fingerprint = base_fingerprint(model)
    if path.exists():
        doc = json.loads(path.read_text())
        if doc.get("fingerprint") != fingerprint:
            raise StateMismatch(
                f"{state_dir} holds state for base {str(doc.get('fingerprint'))[:12]}…, the config describes "
                f"{fingerprint[:12]}…; use another state_dir or restore the matching [model] section"
            )
        schema = AdapterSchema(
            modules={m: (int(o), int(i)) for m, (o, i) in doc["modules"].items()},
            extras={n: tuple(int(d) for d in s) for n, s in doc["extras"].items()},
        )
        if not need_initial:
            return Reference(fingerprint, schema), None
    tensors = initial_adapter(model)
    schema = AdapterSchema.from_adapter(tensors)
    schema = AdapterSchema(schema.modules, {**schema.extras, **personal_shapes(model)})
    doc = {
        "fingerprint": fingerprint,
        "model": model.to_dict(),
        "modules": {m: list(s) for m, s in sorted(schema.modules.items())},
        "extras": {n: list(s) for n, s in sorted(schema.extras.items())},
    }
    atomic_write(path, json.dumps(doc, indent=1, sort_keys=True).encode())
    return Reference(fingerprint, schema), tensors
