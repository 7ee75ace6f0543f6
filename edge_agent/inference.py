"""Serving copy of the edge model, so a prediction never waits for a training step.

The trainer's model is busy (and locked per step) during a round; on MiniLM one step
is about a second on a small CPU. The predictor keeps its own copy of the trainable
tensors (LoRA + personal part, a few hundred KB) and shares the frozen weights with
the trainer's model by storage, so it costs almost no memory. It is refreshed after
each round and each applied global adapter, and runs one batched forward for all
requests waiting at that moment.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from peft import PeftModel

from megace_model.adapters import load_personal, load_shared
from megace_model.batch import collate
from megace_model.config import EdgeModelConfig


class Predictor:
    """Eval-mode model copy; call from one thread at a time (the agent's inference executor)."""

    def __init__(self, model: PeftModel, config: EdgeModelConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.model: PeftModel = copy.deepcopy(model)
        frozen = {name: p for name, p in model.named_parameters() if not p.requires_grad}
        for name, param in self.model.named_parameters():
            if name in frozen:
                param.data = frozen[name].data  # share storage: the frozen base is never written
            param.requires_grad_(False)
        self.model.eval()
        self.version = 0

    def sync(self, shared: Mapping[str, torch.Tensor], personal: Mapping[str, torch.Tensor], version: int) -> None:
        """Install the trainer's current trainable tensors (validated; a failure leaves the copy as is)."""
        load_shared(self.model, shared, strict=True)
        load_personal(self.model, personal)
        self.version = version

    @torch.inference_mode()
    def predict(self, samples: Sequence[Mapping[str, Any]]) -> list[tuple[int, np.ndarray]]:
        """Class index and float32 probabilities for each sample, in one forward pass."""
        batch = collate(samples, self.config, with_labels=False).to(self.device)
        probs = torch.softmax(self.model(**batch.model_inputs()).logits.float(), dim=-1).cpu().numpy()
        return [(int(p.argmax()), p) for p in probs]
