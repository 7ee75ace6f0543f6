"""Config files for the loop's edge and cloud processes, generated from :class:`LoopSettings`.

Every edge declares *all* of the dataset's modalities in its model: the frozen base (and so its
fingerprint, which the cloud checks) must be identical everywhere. What differs per edge is the LoRA
rank and which modalities its devices actually send; the edge reports how much of each modality it
saw, which is what modality-aware aggregation weighs by.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megace.datasets import MultimodalDataset
from megace.loop.settings import LoopSettings

CLOUD_ID = "cloud-0"


def site_id(edge: int) -> str:
    return f"site-{edge}"


def edge_id(edge: int) -> str:
    return f"edge-{edge}"


def device_id(edge: int, device: int) -> str:
    return f"e{edge}-dev{device}"


@dataclass(frozen=True)
class EdgePlan:
    """What the loop decided for one edge."""

    index: int
    rank: int
    modalities: tuple[str, ...]
    samples_per_round: int  # new labelled samples its devices send per round: the edge's round trigger

    @property
    def site(self) -> str:
        return site_id(self.index)

    @property
    def ident(self) -> str:
        return edge_id(self.index)


def model_section(s: LoopSettings, schema: MultimodalDataset, rank: int) -> dict[str, Any]:
    """``[model]`` of an edge (LoRA rank ``rank``) or of the cloud; the frozen base is the same for all."""
    return {
        "modalities": {m: {"token_dim": spec.token_dim, "max_tokens": spec.tokens}
                       for m, spec in schema.modalities.items()},
        "num_classes": len(schema.classes),
        "backbone": s.backbone,
        "lora_r": int(rank),
        "lora_alpha": max(1, round(s.lora_alpha_per_rank * rank)),
        "contrastive_weight": float(s.contrastive_weight),
        "seed": int(s.seed),
    }


def edge_config(s: LoopSettings, schema: MultimodalDataset, plan: EdgePlan, broker_url: str,
                state_dir: Path, round_timeout_s: float, signing: dict[str, Any] | None = None) -> dict[str, Any]:
    """The TOML document of one edge agent (see ``edge_agent.config``); ``signing``: its ``[signing]`` section."""
    training: dict[str, Any] = {
        "min_new_samples": max(1, plan.samples_per_round),
        # Rounds are driven by data arrival; the interval is only a safety net if a sample is rejected.
        "interval_s": float(round_timeout_s),
        "steps": int(s.steps_per_round),
        "batch_size": int(s.batch_size),
        "lr": float(s.lr),
        "share_personal": bool(s.share_personal),
        "local_only": bool(s.local_only),
        "upload_fp16": bool(s.upload_fp16),
        "startup_grace_s": 0.5,
        "torch_threads": 1,
        "device": "cpu",
    }
    training.update(s.extra_edge.get("training", {}))
    doc = {
        "site": plan.site,
        "edge_id": plan.ident,
        "broker": broker_url,
        "state_dir": str(state_dir),
        "metrics_interval_s": 1.0,
        "persistent_session": False,
        "log_level": "WARNING",
        "model": model_section(s, schema, plan.rank),
        "training": training,
    }
    if signing:
        doc["signing"] = dict(signing)
    doc.update({k: v for k, v in s.extra_edge.items() if k != "training"})
    return doc


def cloud_config(s: LoopSettings, schema: MultimodalDataset, n_edges: int, broker_url: str,
                 state_dir: Path, signing: dict[str, Any] | None = None) -> dict[str, Any]:
    """The TOML document of the cloud aggregator (see ``cloud_aggregator.config``); ``signing``: its ``[signing]``."""
    aggregation: dict[str, Any] = {
        "strategy": s.strategy,
        "buffer_k": int(n_edges),  # one global version per round of all edges
        "buffer_period_s": 0.0,
    }
    aggregation.update(s.extra_cloud.get("aggregation", {}))
    limits: dict[str, Any] = {"metrics_period_s": 0.5, "torch_threads": 1}
    limits.update(s.extra_cloud.get("limits", {}))
    doc = {
        "cloud_id": CLOUD_ID,
        "broker": broker_url,
        "state_dir": str(state_dir),
        "model": model_section(s, schema, max(s.ranks)),
        "aggregation": aggregation,
        "limits": limits,
    }
    if signing:
        doc["signing"] = dict(signing)
    doc.update({k: v for k, v in s.extra_cloud.items() if k not in ("aggregation", "limits")})
    return doc


def write_edge_config(doc: dict[str, Any], path: Path) -> Path:
    """Validate with the edge's own loader (a bad value fails here, not in a child) and write its TOML."""
    from edge_agent.config import EdgeConfig

    return EdgeConfig.from_dict(doc).write(path)


def write_cloud_config(doc: dict[str, Any], path: Path) -> Path:
    from cloud_aggregator.config import CloudConfig, write_cloud_config

    return write_cloud_config(CloudConfig.from_dict(doc), path)
