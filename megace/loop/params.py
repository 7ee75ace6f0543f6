"""Parameter counts of the edges' models, for "shared traffic as a % of the model" (imports torch lazily)."""

from __future__ import annotations

from megace.datasets import MultimodalDataset
from megace.loop import configs
from megace.loop.settings import LoopSettings


def parameter_counts(settings: LoopSettings, schema: MultimodalDataset, rank: int) -> dict[str, int]:
    """total / shared / personal / frozen parameters of an edge model with LoRA rank ``rank``."""
    from megace_model.adapters import build_edge_model
    from megace_model.adapters import parameter_counts as counts
    from megace_model.config import EdgeModelConfig

    model = build_edge_model(EdgeModelConfig.from_dict(configs.model_section(settings, schema, rank)))
    return counts(model)


def edge_parameter_counts(settings: LoopSettings, schema: MultimodalDataset) -> dict[str, dict[str, int]]:
    """Counts per edge id (one model build per distinct rank)."""
    by_rank: dict[int, dict[str, int]] = {}
    out = {}
    for e in range(settings.edges):
        r = settings.rank_of(e)
        if r not in by_rank:
            by_rank[r] = parameter_counts(settings, schema, r)
        out[configs.edge_id(e)] = by_rank[r]
    return out
