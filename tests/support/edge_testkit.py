"""Helpers for the edge service tests: configs, a running agent, real devices, polling."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np

from broker.address import BrokerAddress
from broker.wire import CapabilityProfile, FeatureRecord, Kind, ModalityProfile
from device_sdk import DeviceClient
from edge_agent.config import EdgeConfig, deep_merge
from edge_agent.service import EdgeAgent


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def edge_config(state_dir: Path, addr: BrokerAddress, overrides: dict[str, Any] | None = None) -> EdgeConfig:
    """A fast config: tiny model, small rounds, unique site/edge ids (the session broker is shared).

    ONNX serving is off: these tests check the torch serving copy (its layers, bit-equal answers); the ONNX
    path has its own tests (``tests/edge/test_edge_onnx.py``), which turn it on."""
    base: dict[str, Any] = {
        "site": uid("site"),
        "edge_id": uid("edge"),
        "broker": f"mqtt://{addr.host}:{addr.port}",
        "state_dir": str(state_dir),
        "metrics_interval_s": 0.5,
        "training": {"min_new_samples": 40, "interval_s": 600.0, "steps": 12, "batch_size": 16,
                     "startup_grace_s": 0.3, "torch_threads": 1, "device": "cpu", "onnx": "off"},
    }
    return EdgeConfig.from_dict(deep_merge(base, overrides or {}))


@asynccontextmanager
async def running(config: EdgeConfig, timeout: float = 60.0) -> AsyncIterator[EdgeAgent]:
    """Start an agent in this event loop, wait until it is subscribed, stop it cleanly afterwards."""
    agent = EdgeAgent(config)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    ready = asyncio.create_task(agent.ready.wait())
    await asyncio.wait([task, ready], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # raise the agent's error
    assert agent.ready.is_set(), "agent never became ready"
    try:
        yield agent
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout)


async def eventually(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def toy_profile(device: str, *, imu_tokens: int = 4, env_dim: int = 8) -> CapabilityProfile:
    return CapabilityProfile(device=device, modalities={
        "imu": ModalityProfile(shape=(imu_tokens, 6), rate_hz=10.0),
        "env": ModalityProfile(shape=(env_dim,), rate_hz=1.0),
    })


def record(device: str, sample_id: int, sample: dict[str, Any], *, label: bool = True) -> FeatureRecord:
    return FeatureRecord(device=device, sample=sample_id, modalities=dict(sample["modalities"]),
                         label=int(sample["label"]) if label else None)


class Device:
    """A real DeviceClient plus a thread-safe log of what arrived on its downlink."""

    def __init__(self, site: str, device: str, addr: BrokerAddress, store_dir: Path) -> None:
        self.id = device
        self.downlink: list[tuple[Kind, Any]] = []
        self._lock = threading.Lock()
        self.client = DeviceClient(site, device, addr, on_downlink=self._on_downlink,
                                   store_path=store_dir / f"{device}.sqlite")

    def _on_downlink(self, kind: Kind, message: Any) -> None:
        with self._lock:
            self.downlink.append((kind, message))

    def received(self, kind: Kind) -> list[Any]:
        with self._lock:
            return [m for k, m in self.downlink if k is kind]

    async def start(self, profile: CapabilityProfile | None = None, *, register: bool = True) -> Device:
        assert await asyncio.to_thread(self.client.connect, 10.0), "device could not connect"
        if register:
            await asyncio.to_thread(self.client.register, profile or toy_profile(self.id))
        return self

    async def publish(self, records: list[FeatureRecord]) -> None:
        def send() -> None:
            for r in records:
                self.client.publish(r)
            assert self.client.flush(20.0)

        await asyncio.to_thread(send)

    async def infer(self, rec: FeatureRecord) -> int:
        return await asyncio.to_thread(self.client.request_inference, rec)

    async def close(self) -> None:
        await asyncio.to_thread(self.client.close, 5.0)


def same_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return set(a) == set(b) and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)
