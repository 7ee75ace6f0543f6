"""LoRA adapters and the shared / personal split.

Shared (uploaded, aggregated by the cloud): LoRA on the backbone's attention
``query``/``value`` and on every ``modality_proj.<m>``; its names are exactly
``peft.get_peft_model_state_dict`` names, so modality tensors carry
``.modality_proj.<m>.`` for the cloud's modality-aware aggregation.

Personal (never leaves the edge): modality/position embeddings, CLS token, the
cross-modal block and the head. They are plain trainable parameters outside
peft, *not* ``modules_to_save``: with ``modules_to_save`` peft would put them in
its state dict and in ``save_pretrained``, so every upload/export path would
have to filter them out and one forgotten filter would leak local data-shaped
weights. Outside peft, "peft state dict" == "shared part" by construction.
The cross-modal block stays personal because it encodes which modality
combinations this edge's devices produce, which differs from edge to edge.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from megace_common.lora import strip_peft_prefix
from megace_model.classifier import PERSONAL_MODULES, MultimodalClassifier
from megace_model.config import EdgeModelConfig
from megace_model.errors import AdapterMismatchError, NonFiniteAdapterError
from megace_model.seeding import seeded

ADAPTER_NAME = "default"


def lora_config(config: EdgeModelConfig) -> LoraConfig:
    """LoRA targets: backbone query/value and the per-modality input projections."""
    names = "|".join(config.modality_names)
    target = rf"backbone\.encoder\.layer\.\d+\.attention\.self\.(query|value)|modality_proj\.({names})"
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=target,
        bias="none",
    )


def build_base_model(config: EdgeModelConfig) -> MultimodalClassifier:
    """The un-wrapped model (what ``PeftModel.from_pretrained`` needs as its base)."""
    return MultimodalClassifier(config)


def build_edge_model(config: EdgeModelConfig) -> PeftModel:
    """Base model wrapped with LoRA; shared LoRA and personal modules trainable, the rest frozen.

    LoRA A matrices are initialised under the config seed too, so every edge starts
    from the same shared adapter (federated averaging assumes a common start).
    """
    base = build_base_model(config)
    with seeded(config.seed, "lora"):
        peft_model = get_peft_model(base, lora_config(config))
    for name, param in peft_model.get_base_model().named_parameters():
        if name.split(".", 1)[0] in PERSONAL_MODULES:
            param.requires_grad_(True)
    return peft_model


def is_personal(name: str) -> bool:
    """True for a parameter name (with or without peft's prefix) belonging to the personal part."""
    return strip_peft_prefix(name).split(".", 1)[0] in PERSONAL_MODULES


def shared_state(model: PeftModel, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Exactly what is uploaded: detached CPU copies of the LoRA tensors, optionally cast (e.g. float16)."""
    state = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if is_personal(name):  # defence in depth: never upload personal weights
            raise AssertionError(f"personal tensor {name} in peft state dict")
        t = tensor.detach().to("cpu")
        out[name] = (t.to(dtype) if dtype is not None else t).clone()
    return out


def personal_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """Detached CPU copies of the personal (edge-only) parameters."""
    return {
        name: param.detach().to("cpu").clone()
        for name, param in model.get_base_model().named_parameters()
        if name.split(".", 1)[0] in PERSONAL_MODULES
    }


def load_personal(model: PeftModel, tensors: Mapping[str, torch.Tensor]) -> None:
    """Restore personal parameters (checkpoint path); names and shapes must match exactly."""
    params = {n: p for n, p in model.get_base_model().named_parameters() if n.split(".", 1)[0] in PERSONAL_MODULES}
    _check_names_shapes(params, tensors, strict=True, what="personal")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(torch.as_tensor(value).to(params[name].dtype))


def _check_names_shapes(
    expected: Mapping[str, Any], given: Mapping[str, Any], *, strict: bool, what: str
) -> dict[str, torch.Tensor]:
    unknown = sorted(set(given) - set(expected))
    if unknown:
        raise AdapterMismatchError(f"unknown {what} tensor names: {unknown[:5]}{'...' if len(unknown) > 5 else ''}")
    missing = sorted(set(expected) - set(given))
    if strict and missing:
        raise AdapterMismatchError(f"missing {what} tensor names: {missing[:5]}{'...' if len(missing) > 5 else ''}")
    converted: dict[str, torch.Tensor] = {}
    for name, value in given.items():
        tensor = torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value
        if not isinstance(tensor, torch.Tensor):
            raise AdapterMismatchError(f"{name}: expected a tensor or ndarray, got {type(value).__name__}")
        if not (tensor.is_floating_point()):
            raise AdapterMismatchError(f"{name}: expected a floating dtype, got {tensor.dtype}")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise AdapterMismatchError(f"{name}: shape {tuple(tensor.shape)} != expected {tuple(expected[name].shape)}")
        if not torch.isfinite(tensor).all():
            raise NonFiniteAdapterError(f"{name}: contains NaN or infinite values")
        converted[name] = tensor
    return converted


def load_shared(model: PeftModel, tensors: Mapping[str, torch.Tensor | np.ndarray], *, strict: bool = True) -> None:
    """Validate then load shared tensors (torch or numpy, any float dtype).

    Everything is checked before anything is written, so a bad upload raises
    ``AdapterMismatchError`` / ``NonFiniteAdapterError`` and leaves the model as it
    was. ``strict=False`` accepts a subset (e.g. only some modalities' tensors).
    """
    current = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
    converted = _check_names_shapes(current, tensors, strict=strict, what="shared")
    full = {name: t.detach() for name, t in current.items()}
    for name, tensor in converted.items():
        full[name] = tensor.detach().to(device=current[name].device, dtype=current[name].dtype)
    with torch.no_grad():
        result = set_peft_model_state_dict(model, full, adapter_name=ADAPTER_NAME)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:  # cannot happen after validation; fail loudly if peft changes naming
        raise AdapterMismatchError(f"peft rejected keys: {unexpected[:5]}")


def apply_global(model: PeftModel, tensors: Mapping[str, torch.Tensor | np.ndarray]) -> None:
    """Replace the whole shared part with the cloud's global adapter; personal part untouched."""
    load_shared(model, tensors, strict=True)


def parameter_counts(model: PeftModel) -> dict[str, int]:
    """Counts for reporting: total (every parameter incl. LoRA), shared, personal, frozen."""
    total = sum(p.numel() for p in model.parameters())
    shared = sum(t.numel() for t in get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME).values())
    personal = sum(t.numel() for t in personal_state(model).values())
    return {"total": total, "shared": shared, "personal": personal, "frozen": total - shared - personal}


def shared_fraction(model: PeftModel) -> float:
    """Shared parameters / all parameters of the model (the upload-size budget metric)."""
    counts = parameter_counts(model)
    return counts["shared"] / counts["total"]
