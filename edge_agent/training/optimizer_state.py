"""Flatten an optimizer ``state_dict`` into tensors + JSON-safe metadata (and back).

safetensors stores only tensors, so per-parameter tensors (Adam moments, step)
go to the tensor file and everything else (param groups, scalar state) to JSON.
"""

from __future__ import annotations

from typing import Any

import torch

PREFIX = "optim/"


def flatten(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``optimizer.state_dict()`` -> (``{"optim/<idx>/<key>": tensor}``, JSON metadata)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{PREFIX}{idx}/{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of ``flatten`` (ignores tensors without the ``optim/`` prefix)."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if not name.startswith(PREFIX):
            continue
        idx, key = name[len(PREFIX) :].split("/", 1)
        state.setdefault(int(idx), {})[key] = value
    for idx, per_param in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(per_param)
    return {"state": state, "param_groups": meta["param_groups"]}
