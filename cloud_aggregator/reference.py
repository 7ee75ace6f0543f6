"""The frozen base the cloud serves: its fingerprint, the adapter schema, and version 0.

Version 0 of the global is the seeded initial shared adapter (``build_edge_model`` seeds LoRA
under the config seed, so every edge starts from the same one).  Building it needs peft
(~6 s to import), so it is built only when the ledger is empty; the schema and fingerprint
are kept in ``reference.json`` so that a restart skips the model entirely, and so that a
state directory can never be silently reused with a different base.

The same file keeps two scales the poisoning guards judge uploads by from the very first one:
``base_norm`` (Frobenius norm of the frozen weights the adapter modifies: the absolute norm
bound is a multiple of it) and ``a_rms`` (each module's LoRA A row scale at version 0: A is
what every edge starts from and barely rescales, so it pins the factor gauge; see ``balance.py``).
A reference file from before these fields existed is completed once, by building the model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megace_common.durable import atomic_write
from megace_common.lora import add_peft_prefix, is_lora_b, lora_scaling, rescale_b, split_lora
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
    #: ||W0||_F over every module the adapter modifies
    base_norm: float = 0.0
    #: per module: RMS row norm of the initial LoRA A, ||A0||_F / sqrt(r)
    a_rms: dict[str, float] = field(default_factory=dict)


def initial_adapter(model: EdgeModelConfig) -> dict[str, torch.Tensor]:
    """The seeded shared adapter at the global's scaling 1 (``alpha/r`` folded into B)."""
    return _build(model)[0]


def _build(model: EdgeModelConfig) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, ...]], float]:
    """One model build: version 0, the personal tensors' shapes, and ||W0|| over the adapted modules."""
    from megace_model.adapters import build_edge_model, personal_state, shared_state  # lazy: pulls peft

    peft = build_edge_model(model)
    edge = lora_scaling(model.lora_alpha, model.lora_r)
    tensors = {name: rescale_b(t, edge, 1.0) if is_lora_b(name) else t
               for name, t in shared_state(peft, dtype=torch.float32).items()}
    # personal tensors as a share_personal edge uploads them: accepting them lets the no-personalization
    # baselines (FedIT, full-model FedAvg) run through the same cloud; strategies plain-average them
    personal = {add_peft_prefix(n): tuple(t.shape) for n, t in personal_state(peft).items()}
    subs = dict(peft.named_modules())
    total = 0.0
    for m in {p[0] for n in tensors if (p := split_lora(n)) is not None}:
        base = getattr(subs.get(m), "base_layer", None)
        weight = getattr(base, "weight", None)
        if isinstance(weight, torch.Tensor):
            total += float(weight.detach().double().pow(2).sum())
    return tensors, personal, math.sqrt(total)


def a_row_scales(tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per module, ||A||_F / sqrt(r): the RMS norm of one rank component of A."""
    out = {}
    for name, t in tensors.items():
        p = split_lora(name)
        if p is not None and p[1] == "A" and t.dim() == 2 and t.shape[0] > 0:
            out[p[0]] = float(t.double().norm()) / math.sqrt(t.shape[0])
    return out


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
        if not need_initial and "base_norm" in doc and "a_rms" in doc:
            a_rms = {m: float(v) for m, v in doc["a_rms"].items()}
            return Reference(fingerprint, schema, float(doc["base_norm"]), a_rms), None
    tensors, personal, base_norm = _build(model)
    schema = AdapterSchema.from_adapter(tensors)
    schema = AdapterSchema(schema.modules, {**schema.extras, **personal})
    a_rms = a_row_scales(tensors)
    doc = {
        "fingerprint": fingerprint,
        "model": model.to_dict(),
        "modules": {m: list(s) for m, s in sorted(schema.modules.items())},
        "extras": {n: list(s) for n, s in sorted(schema.extras.items())},
        "base_norm": base_norm,
        "a_rms": dict(sorted(a_rms.items())),
    }
    atomic_write(path, json.dumps(doc, indent=1, sort_keys=True).encode())
    return Reference(fingerprint, schema, base_norm, a_rms), tensors if need_initial else None
