"""Simulated IoT devices: each replays its slice of a dataset through the real device SDK.

A device registers its sensors, streams labelled train samples as feature records, and asks its edge
for predictions on its held-out test samples one at a time (request, wait for the ``Prediction``,
next), the way a device that needs the answer would. Accuracy and latency are therefore measured at
the device, end to end over the bus, not read off the edge's own bookkeeping.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.address import BrokerAddress
from broker.wire import CapabilityProfile, DeviceConfig, FeatureRecord, Kind, ModalityProfile, Prediction
from device_sdk import DeviceClient
from megace.datasets import MultimodalDataset


@dataclass(slots=True)
class InferenceResult:
    """One prediction as the device saw it; times are ``time.monotonic()`` seconds, the clock of the loop's tap."""

    device: str
    edge: int
    request: int  # the request's sample number (echoed by the Prediction)
    label: int
    predicted: int | None  # None: no answer before the timeout
    model_version: int
    sent: float
    received: float | None

    @property
    def correct(self) -> bool:
        return self.predicted is not None and self.predicted == self.label

    @property
    def latency_s(self) -> float | None:
        return None if self.received is None else self.received - self.sent


class SimulatedDevice:
    """One device id on one site: a :class:`DeviceClient` plus its train/test samples."""

    def __init__(
        self,
        site: str,
        name: str,
        edge: int,
        train: MultimodalDataset,
        test: MultimodalDataset,
        address: BrokerAddress,
        store_dir: Path,
        edge_key: Path | None = None,
    ) -> None:
        self.site, self.name, self.edge = site, name, edge
        self.train, self.test = train, test
        # edge_key (secure runs): only downlinks signed by this edge's key reach the device
        self.client = DeviceClient(site, name, address, on_downlink=self._on_downlink,
                                   store_path=store_dir / f"{name}.sqlite", edge_key=edge_key)
        self._cursor = 0
        # Unique across runs: a persistent session on a shared broker may deliver an earlier run's answers.
        self._request_ids = itertools.count(time.time_ns() // 1000)
        self._cond = threading.Condition()
        self._answers: dict[int, tuple[Prediction, float]] = {}
        self.config: DeviceConfig | None = None
        self.errors: list[Any] = []
        self.feedback: list[Any] = []
        self.published = 0

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> None:
        """Connect and register the modalities this device's samples carry."""
        if not self.client.connect(timeout):
            raise TimeoutError(f"device {self.name} could not reach the broker at {self.client.address}")
        mods = self.train.modalities or self.test.modalities
        profile = CapabilityProfile(
            device=self.name,
            modalities={m: ModalityProfile(shape=spec.shape, dtype="<f4", rate_hz=1.0) for m, spec in mods.items()},
            compute={"cpu_cores": 1.0},
            sdk_version="megace-sim",
        )
        self.client.register(profile)

    def wait_configured(self, timeout: float) -> bool:
        """True once the edge answered the registration with a configuration packet."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.config is None and time.monotonic() < deadline:
                self._cond.wait(0.05)
            return self.config is not None

    def close(self) -> None:
        self.client.close(timeout=5.0)

    # -- uplink ------------------------------------------------------------------------------------

    def portion(self, stream_rounds: int) -> int:
        """How many train samples this device sends per round so its data arrives over ``stream_rounds``."""
        return math.ceil(len(self.train) / max(stream_rounds, 1)) if len(self.train) else 0

    def publish_train(self, count: int) -> int:
        """Publish the next ``count`` train samples (cycling: after the last comes the first again)."""
        n = len(self.train)
        for _ in range(count if n else 0):
            i = self._cursor % n
            s = self.train[i]
            self.client.publish(FeatureRecord(self.name, self._cursor, dict(s["modalities"]), int(s["label"])))
            self._cursor += 1
        self.published += count if n else 0
        return count if n else 0

    def flush(self, timeout: float = 30.0) -> bool:
        return self.client.flush(timeout)

    def evaluate(self, samples: MultimodalDataset | None = None, timeout: float = 15.0) -> list[InferenceResult]:
        """Ask for a prediction on every sample (default: this device's test split), one request at a time."""
        results: list[InferenceResult] = []
        for s in samples if samples is not None else self.test:
            rid = next(self._request_ids)
            sent = time.monotonic()
            self.client.request_inference(FeatureRecord(self.name, rid, dict(s["modalities"])))
            got = self._wait_answer(rid, timeout)
            pred, received = got if got else (None, None)
            results.append(InferenceResult(
                device=self.name, edge=self.edge, request=rid, label=int(s["label"]),
                predicted=None if pred is None else int(pred.label),
                model_version=0 if pred is None else int(pred.model_version),
                sent=sent, received=received,
            ))
        return results

    def _wait_answer(self, rid: int, timeout: float) -> tuple[Prediction, float] | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while rid not in self._answers:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(min(left, 0.5))
            return self._answers.pop(rid)

    # -- downlink (paho's thread: keep it short) ---------------------------------------------------

    def _on_downlink(self, kind: Kind, msg: Any) -> None:
        now = time.monotonic()
        with self._cond:
            if kind is Kind.PREDICTION:
                self._answers[int(msg.sample)] = (msg, now)
            elif kind is Kind.CONFIG:
                self.config = msg
            elif kind is Kind.ERROR:
                self.errors.append(msg)
            elif kind is Kind.FEEDBACK:
                self.feedback.append(msg)
            self._cond.notify_all()
