"""The multimodal model edge and cloud share: config, classifier, LoRA adapters, contrastive loss, export.

Below both services, so the cloud can describe and rebuild the base model without importing the
edge agent. Importing a submodule pulls torch; ``megace_model.config`` alone does not.

Public: :func:`build_base` (``from megace_model import build_base``), the base every exported
adapter loads onto with plain peft; imported on first use so this package stays light.
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_base"]


def __getattr__(name: str) -> Any:
    if name == "build_base":
        from megace_model.base import build_base

        return build_base
    raise AttributeError(f"module 'megace_model' has no attribute {name!r}")
