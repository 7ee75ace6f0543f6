"""Measurements the loop cannot make by itself: the model forward alone, and the MiniLM parameter budget.

Both build the very model an edge builds (same config) in this process; torch is imported only here.
"""

from __future__ import annotations

import time
from dataclasses import replace

from megace.datasets import MultimodalDataset
from megace.loop import configs
from megace.loop.params import parameter_counts
from megace.loop.results import percentile
from megace.loop.settings import LoopSettings


def inference_ms(settings: LoopSettings, schema: MultimodalDataset, reps: int = 100) -> tuple[float, float]:
    """(p50, p95) ms of one single-sample prediction (collate + forward + softmax) on one thread."""
    import torch

    from edge_agent.training.trainer import Trainer
    from megace_model.config import EdgeModelConfig

    torch.set_num_threads(1)
    trainer = Trainer(EdgeModelConfig.from_dict(configs.model_section(settings, schema, settings.rank_of(0))),
                      device="cpu")
    sample = {"modalities": dict(schema[0]["modalities"])}
    trainer.predict(sample)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        trainer.predict(sample)
        times.append(1000 * (time.perf_counter() - t))
    return percentile(times, 0.5), percentile(times, 0.95)


def minilm_budget(settings: LoopSettings, schema: MultimodalDataset) -> dict[int, dict[str, int]]:
    """Parameter counts per LoRA rank with the MiniLM backbone (what a production edge would run)."""
    s = replace(settings, backbone="minilm")
    return {r: parameter_counts(s, schema, r) for r in sorted(set(settings.ranks), reverse=True)}
