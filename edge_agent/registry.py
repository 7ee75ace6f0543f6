"""The devices an edge serves: profiles from registration, what they may send, counters, de-dup.

A registration is checked against the edge model: only modalities the model knows,
with the token width it expects, are requested back in the ``DeviceConfig``. Every
record is then checked against that agreement before it can reach the model.
Registrations are retained on the broker and re-delivered on every (re)subscribe,
so they are never de-duplicated by sequence number; features and inference requests
are, per device and per stream (exactly-once over QoS 1).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from broker.dedup import SequenceGuard
from broker.wire import CapabilityProfile, DeviceConfig, FeatureRecord
from edge_agent.errors import (
    BadLabelError,
    NonFiniteFeaturesError,
    ProfileMismatchError,
    RegistrationError,
    UnregisteredDeviceError,
)
from megace_model.config import EdgeModelConfig

STREAMS = ("features", "infer")


@dataclass
class DeviceEntry:
    """One registered device."""

    device: str
    profile: CapabilityProfile
    accepted: dict[str, tuple[int, ...]]
    """Modality -> expected array shape (the agreement sent back in the DeviceConfig)."""
    registered_at: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)
    counters: dict[str, int] = field(default_factory=dict)

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def config(self, model_version: int) -> DeviceConfig:
        return DeviceConfig(
            modalities=sorted(self.accepted),
            rate_hz={m: self.profile.modalities[m].rate_hz for m in sorted(self.accepted)},
            shapes=dict(self.accepted),
            model_version=model_version,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "profile": self.profile.to_body(),
            "registered_at": self.registered_at,
            "last_seen": self.last_seen,
            "counters": dict(self.counters),
        }


class DeviceRegistry:
    """Registered devices plus per-stream sequence guards; bounded by ``max_devices``."""

    def __init__(self, model: EdgeModelConfig, *, max_devices: int = 10_000) -> None:
        self.model = model
        self.max_devices = max_devices
        self.devices: dict[str, DeviceEntry] = {}
        self.guards = {stream: SequenceGuard() for stream in STREAMS}

    def __len__(self) -> int:
        return len(self.devices)

    def __contains__(self, device: str) -> bool:
        return device in self.devices

    # ------------------------------------------------------------ registration
    def agreement(self, profile: CapabilityProfile) -> dict[str, tuple[int, ...]]:
        """Modalities of ``profile`` the model can use, with the array shape expected for each."""
        out: dict[str, tuple[int, ...]] = {}
        for name, mod in profile.modalities.items():
            spec = self.model.modalities.get(name)
            if spec is None or mod.shape[-1] != spec.token_dim or len(mod.shape) > 2:
                continue
            out[name] = tuple(mod.shape)
        return out

    def register(self, device: str, profile: CapabilityProfile, *, fresh: bool = False) -> DeviceEntry:
        """Add or update a device; ``fresh`` (a live, non-retained registration) resets its de-dup state.

        A live registration whose seq restarted means the device lost its sequence store;
        keeping the old guard would silently drop all its records as duplicates.
        """
        if profile.device != device:
            raise RegistrationError(f"profile is for {profile.device!r} but arrived on {device!r}'s topic")
        accepted = self.agreement(profile)
        if not accepted:
            wanted = {n: (s.max_tokens, s.token_dim) for n, s in sorted(self.model.modalities.items())}
            raise RegistrationError(f"no usable modality in {sorted(profile.modalities)}; this edge expects {wanted}")
        entry = self.devices.get(device)
        if entry is None:
            if len(self.devices) >= self.max_devices:
                raise RegistrationError(f"registry full ({self.max_devices} devices)")
            entry = DeviceEntry(device=device, profile=profile, accepted=accepted)
            self.devices[device] = entry
        else:
            entry.profile, entry.accepted = profile, accepted
            entry.last_seen = time.time()
        entry.count("registrations")
        if fresh:
            self.reset_sequence(device)
        return entry

    def reset_sequence(self, device: str) -> None:
        for guard in self.guards.values():
            guard.last.pop(device, None)

    # ------------------------------------------------------------------ records
    def is_new(self, stream: str, device: str, seq: int) -> bool:
        """False for a repeated (already processed) sequence number of this device's stream."""
        return self.guards[stream].accept(device, seq)

    def check(self, device: str, record: FeatureRecord, *, need_label: bool) -> dict[str, Any]:
        """Validate a record against the device's agreement and the model; return a model sample.

        ``need_label=False`` (inference) ignores the label. A missing label on a
        feature record is not an error (the sample just cannot be trained on): the
        returned sample then has ``label`` None.
        """
        entry = self.devices.get(device)
        if entry is None:
            raise UnregisteredDeviceError(f"device {device!r} is not registered; publish a registration first")
        entry.last_seen = time.time()
        if record.device != device:
            raise ProfileMismatchError(f"record names device {record.device!r} but came from {device!r}")
        arrays: dict[str, np.ndarray] = {}
        for name, array in record.modalities.items():
            expected = entry.accepted.get(name)
            if expected is None:
                agreed = sorted(entry.accepted)
                raise ProfileMismatchError(f"modality {name!r} is not in {device!r}'s agreement {agreed}")
            _check_shape(name, array, expected)
            if array.dtype.kind != "f":
                raise ProfileMismatchError(f"modality {name!r}: expected floats, got {array.dtype}")
            if not all_finite(array):
                raise NonFiniteFeaturesError(f"modality {name!r} contains NaN or infinite values")
            arrays[name] = array
        label = record.label
        if need_label and label is not None and not 0 <= label < self.model.num_classes:
            raise BadLabelError(f"label {label} outside [0, {self.model.num_classes})")
        return {"modalities": arrays, "label": label if need_label else None}

    # -------------------------------------------------------------- persistence
    def to_dict(self) -> dict[str, Any]:
        return {
            "devices": [e.to_dict() for e in self.devices.values()],
            "guards": {stream: dict(g.last) for stream, g in self.guards.items()},
        }

    def load_dict(self, data: dict[str, Any]) -> None:
        """Restore from :meth:`to_dict`; entries that no longer fit the model are dropped."""
        for item in data.get("devices", []):
            profile = CapabilityProfile.from_body(item["profile"])
            accepted = self.agreement(profile)
            if not accepted:
                continue
            self.devices[item["device"]] = DeviceEntry(
                device=item["device"], profile=profile, accepted=accepted,
                registered_at=float(item.get("registered_at", 0.0)), last_seen=float(item.get("last_seen", 0.0)),
                counters={k: int(v) for k, v in dict(item.get("counters", {})).items()},
            )
        for stream, last in dict(data.get("guards", {})).items():
            if stream in self.guards:
                self.guards[stream].last.update({k: int(v) for k, v in dict(last).items()})


_isfinite = np.isfinite
_all = np.logical_and.reduce


def all_finite(array: np.ndarray) -> bool:
    """``np.isfinite(array).all()`` without numpy's Python-level ``all`` wrapper (half the cost on small arrays)."""
    return bool(_all(_isfinite(array), axis=None))


def _check_shape(name: str, array: np.ndarray, expected: tuple[int, ...]) -> None:
    """Same width as agreed; a sequence may be shorter than the registered one, not longer."""
    shape = array.shape
    ok = (
        array.ndim in (1, 2)
        and shape[-1] == expected[-1]
        and (array.ndim == len(expected) or (array.ndim == 2 and shape[0] == 1 and len(expected) == 1))
        and (array.ndim == 1 or len(expected) == 1 or 1 <= shape[0] <= expected[0])
    )
    if not ok:
        raise ProfileMismatchError(f"modality {name!r}: shape {shape} does not fit the registered {expected}")
