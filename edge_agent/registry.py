"""The devices an edge serves: profiles from registration, what they may send, counters, de-dup.

A registration is checked against the edge model: only modalities the model knows,
with the token width it expects, are requested back in the ``DeviceConfig``. Every
record is then checked against that agreement before it can reach the model.
Registrations are retained on the broker and re-delivered on every (re)subscribe,
so they are never de-duplicated by sequence number; features and inference requests
are, per device and per stream (exactly-once over QoS 1). Features are floats: a modality the
model uses must be registered with a float dtype (``<f2``, ``<f4``, ``<f8``), and a record of
it may use any of the three (the model reads float32; ``docs/wire/SPEC.md`` §3, "Registration").

Everything a sender controls is bounded: the elements a registration may announce per modality
(tied to the model's ``max_tokens`` and a configured maximum), the size of the stored profile, and the
number of devices (a full registry evicts its least recently seen device without recent data rather
than lock newcomers out). A refused message raises a typed error and leaves the registry unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from broker.dedup import GapGuard, SequenceGuard
from broker.wire import CapabilityProfile, DeviceConfig, ErrorCode, FeatureBatch, FeatureRecord
from edge_agent.errors import (
    BadLabelError,
    NonFiniteFeaturesError,
    ProfileMismatchError,
    RegistrationDtypeError,
    RegistrationError,
    UnregisteredDeviceError,
)
from megace_model.config import EdgeModelConfig

STREAMS = ("features", "infer")
INFER_GAPS_MAX = 64
"""Skipped seqs remembered per device in the infer stream (mostly the device's records: they share one counter)."""
MAX_PROFILE_ENTRIES = 64
"""Most modalities or compute entries one registration may list (profiles are kept and persisted)."""
MAX_SDK_VERSION = 64
FLOAT_DTYPES = frozenset({"<f2", "<f4", "<f8"})
"""The wire dtypes a feature modality may be registered and sent with (the model reads float32)."""


class RegistrationLimitError(RegistrationError):
    """A registration announces more than this edge accepts from one device (elements, entries)."""

    code = ErrorCode.REGISTRATION_LIMIT


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
    last_data: float = 0.0
    """When a record of this device last passed the checks (0: never); devices without recent data may be evicted."""

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    @property
    def local_model(self) -> bool:
        """The device asked for the inference model to predict on itself (see :mod:`edge_agent.model_push`)."""
        return self.profile.local_model

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
            "last_data": self.last_data,
            "counters": dict(self.counters),
        }


class DeviceRegistry:
    """Registered devices plus per-stream sequence guards; bounded by ``max_devices``."""

    def __init__(
        self,
        model: EdgeModelConfig,
        *,
        max_devices: int = 10_000,
        idle_evict_s: float = 900.0,
        max_modality_elements: int = 65_536,
        max_sequence_factor: int = 4,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.model = model
        self.max_devices = max_devices
        self.idle_evict_s = idle_evict_s
        self.max_modality_elements = max_modality_elements
        self.max_sequence_factor = max_sequence_factor
        self.clock = clock
        self.devices: dict[str, DeviceEntry] = {}
        self.guards: dict[str, SequenceGuard] = {stream: SequenceGuard() for stream in STREAMS}
        self.features = self.guards["features"] = GapGuard()
        """Records are gap-aware: a device re-sends what a receipt said is missing, below the mark (``receipts``)."""
        self.guards["infer"] = GapGuard(max_gaps=INFER_GAPS_MAX)
        """Requests too: a device re-sends one the broker lost, below the mark (``edge_agent.answers``)."""
        self.evicted = 0
        """Devices evicted to make room for newcomers (the service publishes it as ``devices_evicted``)."""

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
            if spec is None or mod.shape[-1] != spec.token_dim or len(mod.shape) > 2 or mod.dtype not in FLOAT_DTYPES:
                continue
            out[name] = tuple(mod.shape)
        return out

    def limit_error(self, profile: CapabilityProfile) -> RegistrationLimitError | None:
        """Why ``profile`` announces more than this edge accepts from one device, or None.

        A modality the model uses may announce at most ``max_sequence_factor * max_tokens`` tokens and
        ``max_modality_elements`` elements: ``[10**6, 6]`` was once agreed to because only width and rank
        were checked.
        """
        if len(profile.modalities) > MAX_PROFILE_ENTRIES or len(profile.compute) > MAX_PROFILE_ENTRIES:
            return RegistrationLimitError(f"a registration may list at most {MAX_PROFILE_ENTRIES} modalities and "
                                          f"{MAX_PROFILE_ENTRIES} compute entries")
        if len(profile.sdk_version) > MAX_SDK_VERSION:
            return RegistrationLimitError(f"sdk version longer than {MAX_SDK_VERSION} characters")
        for name, mod in sorted(profile.modalities.items()):
            spec = self.model.modalities.get(name)
            if spec is None or not mod.shape:
                continue
            tokens = mod.shape[0] if len(mod.shape) > 1 else 1
            elements = 1
            for d in mod.shape:
                elements *= d
            max_tokens = spec.max_tokens * self.max_sequence_factor
            if tokens > max_tokens or elements > self.max_modality_elements:
                return RegistrationLimitError(
                    f"modality {name!r}: shape {tuple(mod.shape)} exceeds this edge's bound of {max_tokens} tokens "
                    f"and {self.max_modality_elements} elements")
        return None

    def dtype_error(self, profile: CapabilityProfile) -> RegistrationDtypeError | None:
        """Why ``profile`` cannot be served as it stands: a modality the model uses, registered as non-float.

        Such registrations were once agreed to, and then every record of the modality was refused as not
        float; modalities the model does not use are not judged (another edge may use them).
        """
        for name, mod in sorted(profile.modalities.items()):
            if name in self.model.modalities and mod.dtype not in FLOAT_DTYPES:
                return RegistrationDtypeError(f"modality {name!r} is registered as {mod.dtype}; this edge takes "
                                              f"features as one of {sorted(FLOAT_DTYPES)}")
        return None

    def register(self, device: str, profile: CapabilityProfile, *, fresh: bool = False) -> DeviceEntry:
        """Add or update a device; ``fresh`` (a live, non-retained registration) resets its de-dup state.

        A live registration whose seq restarted means the device lost its sequence store;
        keeping the old guard would silently drop all its records as duplicates.
        Every check runs before anything changes: a refused registration leaves the registry as it was.
        """
        if profile.device != device:
            raise RegistrationError(f"profile is for {profile.device!r} but arrived on {device!r}'s topic")
        error = self.limit_error(profile) or self.dtype_error(profile)
        if error is not None:
            raise error
        accepted = self.agreement(profile)
        if not accepted:
            wanted = {n: (s.max_tokens, s.token_dim) for n, s in sorted(self.model.modalities.items())}
            raise RegistrationError(f"no usable modality in {sorted(profile.modalities)}; this edge expects {wanted}")
        kept = CapabilityProfile(profile.device, {m: profile.modalities[m] for m in accepted}, dict(profile.compute),
                                 profile.sdk_version, profile.epoch,  # only what was agreed is stored (and persisted)
                                 profile.local_model, profile.model_version)
        now = self.clock()
        entry = self.devices.get(device)
        if entry is None:
            if len(self.devices) >= self.max_devices:
                victim = self._eviction_candidate(now)
                if victim is None:
                    raise RegistrationError(f"registry full ({self.max_devices} devices)")
                del self.devices[victim]
                self.reset_sequence(victim)
                self.evicted += 1
            entry = DeviceEntry(device=device, profile=kept, accepted=accepted, registered_at=now, last_seen=now)
            self.devices[device] = entry
        else:
            entry.profile, entry.accepted = kept, accepted
            entry.last_seen = now
        entry.count("registrations")
        if fresh:
            self.reset_sequence(device)
        return entry

    def _eviction_candidate(self, now: float) -> str | None:
        """The least recently seen device with no accepted record for ``idle_evict_s``, if any.

        Idle time counts from the later of its first registration and its last accepted record: a newcomer
        gets the same grace as anyone, and re-sending a registration (retained or not) does not refresh it.
        """
        best: DeviceEntry | None = None
        for entry in self.devices.values():
            idle = now - max(entry.last_data, entry.registered_at)
            if idle > self.idle_evict_s and (best is None or entry.last_seen < best.last_seen):
                best = entry
        return None if best is None else best.device

    def reset_sequence(self, device: str) -> None:
        for guard in self.guards.values():
            if isinstance(guard, GapGuard):
                guard.forget(device)
            else:
                guard.last.pop(device, None)

    # ------------------------------------------------------------------ records
    def is_new(self, stream: str, device: str, seq: int) -> bool:
        """False for a repeated (already processed) sequence number of this device's stream."""
        return self.guards[stream].accept(device, seq)

    def is_duplicate(self, stream: str, device: str, seq: int) -> bool:
        """True for a sequence number already processed; records nothing (check first, then :meth:`is_new`)."""
        return self.guards[stream].seen(device, seq)

    def check(self, device: str, record: FeatureRecord, *, need_label: bool) -> dict[str, Any]:
        """Validate a record against the device's agreement and the model; return a model sample.

        ``need_label=False`` (inference) ignores the label. A missing label on a
        feature record is not an error (the sample just cannot be trained on): the
        returned sample then has ``label`` None.
        """
        entry = self.devices.get(device)
        if entry is None:
            raise UnregisteredDeviceError(f"device {device!r} is not registered; publish a registration first")
        if record.device != device:
            raise ProfileMismatchError(f"record names device {record.device!r} but came from {device!r}")
        arrays: dict[str, np.ndarray] = {}
        for name, array in record.modalities.items():
            expected = entry.accepted.get(name)
            if expected is None:
                agreed = sorted(entry.accepted)
                raise ProfileMismatchError(f"modality {name!r} is not in {device!r}'s agreement {agreed}")
            _check_shape(name, array, expected)
            _check_values(name, array)
            arrays[name] = array
        label = record.label
        if need_label and label is not None and not 0 <= label < self.model.num_classes:
            raise BadLabelError(f"label {label} outside [0, {self.model.num_classes})")
        entry.last_seen = entry.last_data = self.clock()  # only a record that passed counts as data
        return {"modalities": arrays, "label": label if need_label else None}

    def check_batch(self, device: str, batch: FeatureBatch) -> dict[str, Any]:
        """Validate a whole batch as :meth:`check` does one record: one numpy check per modality, all or nothing.

        A stacked array ``[count, ...]`` fits when its record shape (``shape[1:]``) fits the agreement; finiteness
        and float32 range are checked on the stacked array at once, labels by their minimum and maximum.
        Returns ``{"modalities": {name: stacked array}, "labels": array or None}``.
        """
        entry = self.devices.get(device)
        if entry is None:
            raise UnregisteredDeviceError(f"device {device!r} is not registered; publish a registration first")
        if batch.device != device:
            raise ProfileMismatchError(f"batch names device {batch.device!r} but came from {device!r}")
        for name, array in batch.modalities.items():
            expected = entry.accepted.get(name)
            if expected is None:
                agreed = sorted(entry.accepted)
                raise ProfileMismatchError(f"modality {name!r} is not in {device!r}'s agreement {agreed}")
            _check_record_shape(name, array.shape[1:], expected)
            _check_values(name, array)
        labels = batch.labels
        if labels is not None and int(labels.max()) >= self.model.num_classes:
            raise BadLabelError(f"label {int(labels.max())} outside [0, {self.model.num_classes})")
        entry.last_seen = entry.last_data = self.clock()
        return {"modalities": batch.modalities, "labels": labels}

    # -------------------------------------------------------------- persistence
    def to_dict(self) -> dict[str, Any]:
        return {
            "devices": [e.to_dict() for e in self.devices.values()],
            "guards": {stream: dict(g.last) for stream, g in self.guards.items()},
            "holes": self.features.holes_dict(),
            "floors": dict(self.features.floors),
        }

    def load_dict(self, data: dict[str, Any]) -> None:
        """Restore from :meth:`to_dict`; entries that no longer fit the model are dropped."""
        for item in data.get("devices", []):
            profile = CapabilityProfile.from_body(item["profile"])
            accepted = self.agreement(profile)
            if not accepted or self.limit_error(profile) is not None or self.dtype_error(profile) is not None:
                continue
            self.devices[item["device"]] = DeviceEntry(
                device=item["device"], profile=profile, accepted=accepted,
                registered_at=float(item.get("registered_at", 0.0)), last_seen=float(item.get("last_seen", 0.0)),
                counters={k: int(v) for k, v in dict(item.get("counters", {})).items()},
                last_data=float(item.get("last_data", 0.0)),
            )
        for stream, last in dict(data.get("guards", {})).items():
            if stream in self.guards:
                self.guards[stream].last.update({k: int(v) for k, v in dict(last).items()})
        for device, holes in dict(data.get("holes", {})).items():
            self.features.holes[str(device)] = {int(s) for s in holes}
        self.features.floors.update({str(k): int(v) for k, v in dict(data.get("floors", {})).items()})


_isfinite = np.isfinite
_all = np.logical_and.reduce


def all_finite(array: np.ndarray) -> bool:
    """``np.isfinite(array).all()`` without numpy's Python-level ``all`` wrapper (half the cost on small arrays)."""
    return bool(_all(_isfinite(array), axis=None))


def fits_float32(array: np.ndarray) -> bool:
    """Whether every value stays finite as float32 (training converts to it): 1e300 as ``<f8`` does not."""
    with np.errstate(over="ignore", invalid="ignore"):
        return all_finite(array.astype(np.float32))


def _check_shape(name: str, array: np.ndarray, expected: tuple[int, ...]) -> None:
    """Same width as agreed; a sequence may be shorter than the registered one, not longer."""
    _check_record_shape(name, array.shape, expected)


def _check_values(name: str, array: np.ndarray) -> None:
    """Floats, finite, and within float32's range (what training will cast them to); one record or a stack."""
    if array.dtype.kind != "f":
        raise ProfileMismatchError(f"modality {name!r}: expected floats, got {array.dtype}")
    if not all_finite(array):
        raise NonFiniteFeaturesError(f"modality {name!r} contains NaN or infinite values")
    if array.dtype.itemsize > 4 and not fits_float32(array):
        raise NonFiniteFeaturesError(f"modality {name!r} holds values beyond float32's range "
                                     "(they would train as infinities)")


def _check_record_shape(name: str, shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    """:func:`_check_shape` on a record's shape (a batch checks its stacked arrays' ``shape[1:]`` once)."""
    ndim = len(shape)
    ok = (
        ndim in (1, 2)
        and shape[-1] == expected[-1]
        and (ndim == len(expected) or (ndim == 2 and shape[0] == 1 and len(expected) == 1))
        and (ndim == 1 or len(expected) == 1 or 1 <= shape[0] <= expected[0])
    )
    if not ok:
        raise ProfileMismatchError(f"modality {name!r}: shape {shape} does not fit the registered {expected}")
