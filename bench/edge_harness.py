"""What the edge benchmarks share: the agent on its own thread, the bench site's devices and profiles, paho
publishers that check every PUBACK, and a device's predictions as they arrive (``bench_edge.py``,
``edge_ingest.py``, ``bench_device_model.py``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt

from broker import topics
from broker.address import BrokerAddress
from broker.wire import CapabilityProfile, Kind, ModalityProfile, encode_envelope
from device_sdk import DeviceClient
from edge_agent.config import EdgeConfig, deep_merge
from edge_agent.service import EdgeAgent

SITE = "bench"
DEVICES = [f"dev-{i}" for i in range(8)]

class AgentThread:
    """The agent on its own event loop in a thread, so this script can drive sync device clients."""

    def __init__(self, config: EdgeConfig) -> None:
        self.agent = EdgeAgent(config)
        self.loop = asyncio.new_event_loop()
        self.stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.error: BaseException | None = None
        self.watch: Callable[[], Coroutine[Any, Any, None]] | None = None
        """Optional coroutine run on the agent's loop beside it (in-loop timing)."""

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def go() -> None:
            self.stop = asyncio.Event()
            watcher = asyncio.create_task(self.watch()) if self.watch is not None else None
            await self.agent.run(self.stop)
            if watcher is not None:
                watcher.cancel()

        try:
            self.loop.run_until_complete(go())
        except BaseException as exc:  # surfaced by wait_ready/close
            self.error = exc

    def start(self, timeout: float = 120.0) -> AgentThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.agent.ready.is_set():
            if self.error is not None or time.monotonic() > deadline:
                raise RuntimeError(f"agent did not start: {self.error!r}")
            time.sleep(0.01)
        return self

    def close(self) -> None:
        if self.stop is not None:
            self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(120)


def config_for(addr: BrokerAddress, state: Path, edge_id: str, **extra: Any) -> EdgeConfig:
    base: dict[str, Any] = {
        "site": SITE, "edge_id": edge_id, "broker": f"mqtt://{addr.host}:{addr.port}", "state_dir": str(state),
        "metrics_interval_s": 1.0, "log_level": "WARNING",
        "training": {"min_new_samples": 10**9, "interval_s": 10**6, "torch_threads": 1, "device": "cpu",
                     "startup_grace_s": 0.2},
        "limits": {"mqtt_queue": 50_000}, "ingest_receiver": RECEIVER[0], "receipts": RECEIPTS[0],
    }
    return EdgeConfig.from_dict(deep_merge(base, extra))

RECEIVER = ["process"]
"""The agent's ``ingest_receiver`` for (a'), (b) and the ratio of (a) (``bench_edge.py --receiver``)."""
RECEIPTS = [os.environ.get("BENCH_RECEIPTS", "1") == "1"]
"""The agent's ``receipts`` (``BENCH_RECEIPTS=0``: off, to measure what end-to-end receipts cost the ingest)."""


def profile(device: str) -> CapabilityProfile:
    return CapabilityProfile(device=device, modalities={"imu": ModalityProfile(shape=(4, 6), rate_hz=10.0),
                                                        "env": ModalityProfile(shape=(8,), rate_hz=1.0)})


def paho_client(addr: BrokerAddress, ident: str, *, clean: bool = True) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=ident, protocol=mqtt.MQTTv311, clean_session=clean)
    c.max_inflight_messages_set(100)
    c.connect(addr.host, addr.port)
    c.loop_start()
    return c


def wait_all(infos: list[mqtt.MQTTMessageInfo], timeout: float, what: str) -> None:
    """Wait for every PUBACK; raise if one is missing (paho's wait_for_publish returns silently on timeout)."""
    deadline = time.monotonic() + timeout
    for info in infos:
        info.wait_for_publish(max(0.0, deadline - time.monotonic()))
    missing = sum(not i.is_published() for i in infos)
    if missing:
        raise RuntimeError(f"{what}: {missing} of {len(infos)} publishes without a PUBACK after {timeout:.0f} s")

def register_devices(addr: BrokerAddress) -> None:
    pub = paho_client(addr, "bench-register")
    infos = []
    for dev in DEVICES:
        payload = encode_envelope(Kind.REGISTER, dev, 0, profile(dev).to_body())
        infos.append(pub.publish(topics.device_up(SITE, dev, topics.Uplink.REGISTER), payload, qos=1, retain=True))
    wait_all(infos, 30, "registration")
    pub.disconnect()
    pub.loop_stop()

class Answers:
    """A bench device's predictions as they arrive: ``sample -> (arrival time, probabilities)``."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.got: dict[int, tuple[float, np.ndarray]] = {}
        self.configured = threading.Event()

    def on_downlink(self, kind: Kind, msg: Any) -> None:
        if kind is Kind.PREDICTION:
            with self.cond:
                self.got[int(msg.sample)] = (time.perf_counter(), np.asarray(msg.probs))
                self.cond.notify_all()
        elif kind is Kind.CONFIG:
            self.configured.set()

    def device(self, addr: BrokerAddress, name: str, store: Path, **kwargs: Any) -> DeviceClient:
        """An SDK device connected, registered and configured by the edge (its downlinks land here)."""
        dev = DeviceClient(SITE, name, addr, on_downlink=self.on_downlink, store_path=store, **kwargs)
        if not dev.connect(10):
            raise RuntimeError(f"{name}: not connected in 10 s")
        dev.register(profile(name))
        if not self.configured.wait(10):
            raise RuntimeError(f"{name}: no configuration from the edge in 10 s")
        return dev

    def wait(self, sample: int, timeout: float = 5.0) -> tuple[float, np.ndarray]:
        with self.cond:
            if not self.cond.wait_for(lambda: sample in self.got, timeout):
                raise RuntimeError(f"no prediction for request {sample} in {timeout:g} s")
            return self.got[sample]


def quantile(values: list[float], q: float) -> float:
    xs = sorted(values)
    return xs[int(q * (len(xs) - 1))]

