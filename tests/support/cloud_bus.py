"""Shared pieces of the cloud service tests: the tiny edge model, uploads built from it, configs."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np

from broker.address import BrokerAddress
from broker.wire import AdapterUpdate, Kind, encode_envelope
from cloud_aggregator.config import CloudConfig, load_cloud_config
from megace_model.config import EdgeModelConfig, ModalitySpec

MODALITIES = {"audio": {"token_dim": 12, "max_tokens": 2}, "image": {"token_dim": 20, "max_tokens": 1}}
MAX_RANK = 8


def model_config(rank: int = MAX_RANK) -> EdgeModelConfig:
    """The frozen base every test edge shares; only the LoRA rank (and alpha = 2r) differs."""
    mods = {n: ModalitySpec(**s) for n, s in MODALITIES.items()}
    return EdgeModelConfig(modalities=mods, num_classes=3, lora_r=rank, lora_alpha=2 * rank)


def cloud_config(state_dir: Path, addr: BrokerAddress, **overrides: Any) -> CloudConfig:
    base: dict[str, Any] = {
        "cloud_id": "cloud-test",
        "broker": f"mqtt://{addr.host}:{addr.port}",
        "state_dir": str(state_dir),
        "model": {"modalities": MODALITIES, "num_classes": 3, "lora_r": MAX_RANK, "lora_alpha": 2 * MAX_RANK},
    }
    return load_cloud_config(None, {**base, **overrides}, environ={})


def perturbed(tensors: dict[str, Any], seed: int, scale: float = 0.02) -> dict[str, np.ndarray]:
    """What a local training round does to the shared adapter, roughly: small moves of A and B."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, t in tensors.items():
        a = np.asarray(t, dtype=np.float32)
        out[name] = (a + scale * rng.standard_normal(a.shape).astype(np.float32)).astype(np.float32)
    return out


def update_payload(
    tensors: dict[str, np.ndarray],
    *,
    site: str,
    seq: int,
    base_version: int,
    fingerprint: str,
    rank: int,
    alpha: float | None = None,
    samples: int = 32,
    modalities: dict[str, int] | None = None,
    edge: str | None = None,
    body_site: str | None = None,
) -> bytes:
    update = AdapterUpdate(
        edge=edge or f"edge-{site}",
        site=body_site or site,
        seq=seq,
        base_version=base_version,
        base_model=fingerprint,
        rank=rank,
        alpha=float(2 * rank if alpha is None else alpha),
        samples=samples,
        modalities=dict(modalities if modalities is not None else {"audio": samples, "image": samples}),
        tensors=tensors,
    )
    return encode_envelope(Kind.ADAPTER, update.edge, seq, update.to_body())


async def eventually(pred, timeout: float = 20.0, interval: float = 0.05, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll ``pred`` (sync) until it is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(interval)
