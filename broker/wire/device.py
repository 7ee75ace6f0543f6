"""Messages between a device and its edge: features, registration, config, predictions, errors.

A :class:`FeatureRecord` is one sample of one device: one or several modalities
(name -> array), an optional label and optional quality indicators. Records of
the same sample always travel together, so the edge never has to join streams.
"""

from __future__ import annotations

from dataclasses import field
from typing import TYPE_CHECKING, Any

from broker.compat import StrEnum, slotted_dataclass
from broker.errors import DecodeError, UnknownModalityError
from broker.wire.arrays import DTYPES, MAX_EXTENT, MAX_NDIM, decode_array, encode_array, numpy
from broker.wire.fields import (
    body_map,
    check_modality,
    get_float,
    get_int,
    get_list,
    get_map,
    get_str,
    number_map,
)

if TYPE_CHECKING:
    import numpy as np


@slotted_dataclass()
class FeatureRecord:
    """One multimodal sample as a device publishes it (also the body of an inference request)."""

    device: str
    sample: int
    modalities: dict[str, np.ndarray]
    label: int | None = None
    quality: dict[str, float] = field(default_factory=dict)

    def to_body(self) -> dict[str, Any]:
        sample = int(self.sample)
        modalities: dict[str, Any] = {}
        for k, v in self.modalities.items():  # a loop, not a comprehension: no function call per record
            modalities[check_modality(k)] = encode_array(v)
        body: dict[str, Any] = {"device": self.device, "sample": sample, "modalities": modalities}
        if self.label is not None:
            body["label"] = int(self.label)
        if self.quality:
            body["quality"] = {k: float(v) for k, v in self.quality.items()}
        return body

    @classmethod
    def from_body(
        cls,
        body: Any,
        *,
        allowed_modalities: frozenset[str] | set[str] | None = None,
        max_array_bytes: int | None = None,
    ) -> FeatureRecord:
        # The ingest hot path of every edge: the common, well-formed case is checked inline; anything
        # else falls through to the generic field helpers, so errors (class and message) are unchanged.
        b = body_map(body, "features")
        mods = b.get("modalities")
        if type(mods) is not dict:
            mods = get_map(b, "modalities")
        if not mods:
            raise UnknownModalityError("a feature record needs at least one modality")
        arrays = {
            check_modality(name, allowed_modalities): decode_array(arr, max_bytes=max_array_bytes)
            for name, arr in mods.items()
        }
        device, sample, label, quality = b.get("device"), b.get("sample"), b.get("label"), b.get("quality")
        if type(device) is not str:
            device = get_str(b, "device")
        if type(sample) is not int or sample < 0:
            sample = get_int(b, "sample")
        if label is not None and (type(label) is not int or label < 0):
            label = get_int(b, "label", optional=True)
        return cls(
            device=device,  # type: ignore[arg-type]
            sample=sample,  # type: ignore[arg-type]
            modalities=arrays,
            label=label,
            quality=number_map(quality, "quality") if type(quality) is dict and quality else
            number_map(get_map(b, "quality", optional=True), "quality"),
        )


@slotted_dataclass(frozen=True)
class ModalityProfile:
    """What a device can produce for one modality."""

    shape: tuple[int, ...]
    dtype: str = "<f4"
    rate_hz: float = 1.0

    def to_body(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype, "rate_hz": float(self.rate_hz)}

    @classmethod
    def from_body(cls, body: Any) -> ModalityProfile:
        b = body_map(body, "modality profile")
        shape = get_list(b, "shape")
        if not _is_shape(shape):
            raise DecodeError(f"modality shape must be 1 to {MAX_NDIM} positive ints, got {shape!r}")
        dtype = get_str(b, "dtype")
        if dtype not in DTYPES:
            raise DecodeError(f"unsupported dtype {dtype!r} in modality profile")
        rate = get_float(b, "rate_hz", finite=True)
        assert rate is not None
        if rate < 0:
            raise DecodeError(f"field 'rate_hz' must be >= 0, got {rate!r}")
        return cls(shape=tuple(shape), dtype=dtype, rate_hz=rate)


def _is_shape(shape: Any) -> bool:
    """A shape a receiver can act on: 1..MAX_NDIM positive ints whose extent fits any array.

    An empty shape has no token width to check (the edge read ``shape[-1]`` and crashed), and a
    dimension of 2**64-1 only overflows whoever multiplies it later.
    """
    if not isinstance(shape, list) or not 1 <= len(shape) <= MAX_NDIM:
        return False
    extent = 1
    for d in shape:
        if not isinstance(d, int) or isinstance(d, bool) or d <= 0:
            return False
        extent *= d
    return extent <= MAX_EXTENT


@slotted_dataclass()
class CapabilityProfile:
    """A device's registration: modalities it can sense and the compute it has."""

    device: str
    modalities: dict[str, ModalityProfile]
    compute: dict[str, float] = field(default_factory=dict)
    sdk_version: str = ""
    epoch: int = 0
    """Identifies the device's sequence store (random, made with it; 0: not sent). A new epoch tells the
    edge the device's seqs started over; the same epoch redelivered or re-sent never does."""
    local_model: bool = False
    """The device predicts locally and asks its edge for the inference model (``model`` downlink); not sent
    when False, so registrations of devices that do not ask stay byte-identical to older ones."""
    model_version: int | None = None
    """The version of the model the device holds (None: none, not sent), so an edge does not send it again."""
    resend_from: int | None = None
    """The lowest seq of a record the device may still (re-)send (None: not sent): an edge with receipts
    forgets the gaps below it and never opens one there (a restarted device skips the rest of its seq block)."""

    def to_body(self) -> dict[str, Any]:
        body = {
            "device": self.device,
            "modalities": {check_modality(k): v.to_body() for k, v in self.modalities.items()},
            "compute": {k: float(v) for k, v in self.compute.items()},
            "sdk": self.sdk_version,
        }
        if self.epoch:
            body["epoch"] = int(self.epoch)
        if self.local_model:
            body["local_model"] = True
        if self.model_version is not None:
            body["model_version"] = int(self.model_version)
        if self.resend_from is not None:
            body["resend_from"] = int(self.resend_from)
        return body

    @classmethod
    def from_body(cls, body: Any) -> CapabilityProfile:
        b = body_map(body, "register")
        mods = get_map(b, "modalities")
        if not mods:
            raise UnknownModalityError("a capability profile needs at least one modality")
        return cls(
            device=get_str(b, "device"),  # type: ignore[arg-type]
            modalities={check_modality(k): ModalityProfile.from_body(v) for k, v in mods.items()},
            compute=number_map(get_map(b, "compute", optional=True), "compute"),
            sdk_version=get_str(b, "sdk", optional=True) or "",
            epoch=_epoch(get_int(b, "epoch", optional=True)),
            local_model=_flag(b, "local_model"),
            model_version=_model_version(get_int(b, "model_version", optional=True)),
            resend_from=_resend_from(get_int(b, "resend_from", optional=True)),
        )


def _flag(body: dict[str, Any], key: str) -> bool:
    """An optional msgpack boolean (absent: False); ``1`` or ``"true"`` is refused, not guessed."""
    value = body.get(key)
    if value is None:
        return False
    if type(value) is not bool:
        raise DecodeError(f"field {key!r} must be true or false, got {value!r}")
    return value


def _model_version(value: int | None) -> int | None:
    if value is not None and value >= 2**63:
        raise DecodeError(f"model_version {value} is out of range (0 <= v < 2^63)")
    return value


def _resend_from(value: int | None) -> int | None:
    if value is not None and value >= 2**63:
        raise DecodeError(f"resend_from {value} is out of range (0 <= seq < 2^63)")
    return value


def _epoch(value: int | None) -> int:
    if value is not None and value >= 2**63:
        raise DecodeError(f"epoch {value} is out of range (0 <= epoch < 2^63)")
    return value or 0


@slotted_dataclass()
class DeviceConfig:
    """The edge's answer to a registration: what to send, how often, in which shape."""

    modalities: list[str]
    rate_hz: dict[str, float] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    model_version: int = 0
    receipts: bool = False
    """The edge sends ``receipt`` downlinks: the device keeps each record until one covers it (SPEC, "Receipts").
    Encoded only when true, so an older edge's config (and its test vector) stays byte-identical."""

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "modalities": [check_modality(m) for m in self.modalities],
            "rate_hz": {k: float(v) for k, v in self.rate_hz.items()},
            "shapes": {k: list(v) for k, v in self.shapes.items()},
            "model_version": int(self.model_version),
        }
        if self.receipts:
            body["receipts"] = True
        return body

    @classmethod
    def from_body(cls, body: Any) -> DeviceConfig:
        b = body_map(body, "config")
        shapes = {}
        for k, v in get_map(b, "shapes", optional=True).items():
            # a shape off the wire is a list of positive ints: not a string to iterate, nor floats to truncate
            if not _is_shape(v):
                raise DecodeError(f"config shape of {k!r} must be a list of 1 to {MAX_NDIM} positive ints, got {v!r}")
            shapes[check_modality(k)] = tuple(v)
        return cls(
            modalities=[check_modality(m) for m in get_list(b, "modalities")],
            rate_hz=number_map(get_map(b, "rate_hz", optional=True), "rate_hz"),
            shapes=shapes,
            model_version=get_int(b, "model_version", optional=True) or 0,
            receipts=b.get("receipts") is True,
        )


@slotted_dataclass()
class Prediction:
    """The edge's answer to an inference request (``sample`` echoes the request's)."""

    device: str
    sample: int
    label: int
    probs: np.ndarray
    model_version: int = 0

    def to_body(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "sample": int(self.sample),
            "label": int(self.label),
            "probs": encode_array(numpy().asarray(self.probs, dtype="<f4")),
            "model_version": int(self.model_version),
        }

    @classmethod
    def from_body(cls, body: Any) -> Prediction:
        b = body_map(body, "prediction")
        return cls(
            device=get_str(b, "device"),  # type: ignore[arg-type]
            sample=get_int(b, "sample"),  # type: ignore[arg-type]
            label=get_int(b, "label"),  # type: ignore[arg-type]
            probs=decode_array(get_map(b, "probs")),
            model_version=get_int(b, "model_version", optional=True) or 0,
        )


@slotted_dataclass()
class DeviceFeedback:
    """Top-down feedback relayed to a device: the model version it is served by and how it does."""

    global_version: int
    metrics: dict[str, float] = field(default_factory=dict)
    message: str = ""

    def to_body(self) -> dict[str, Any]:
        return {
            "global_version": int(self.global_version),
            "metrics": {k: float(v) for k, v in self.metrics.items()},
            "message": self.message,
        }

    @classmethod
    def from_body(cls, body: Any) -> DeviceFeedback:
        b = body_map(body, "feedback")
        return cls(
            global_version=get_int(b, "global_version"),  # type: ignore[arg-type]
            metrics=number_map(get_map(b, "metrics", optional=True), "metrics"),
            message=get_str(b, "message", optional=True) or "",
        )


class ErrorCode(StrEnum):
    """Every ``code`` an ``error`` downlink may carry: the one list the edge and the spec's table come from.

    A device acts on the code (fix its encoder, register again, retry later); the ``message`` is for people.
    ``tests/broker/test_spec_codes.py`` checks that ``docs/wire/SPEC.md`` lists exactly :data:`ERROR_CODES`.
    """

    MALFORMED = "malformed"
    SENDER_MISMATCH = "sender_mismatch"
    UNREGISTERED = "unregistered"
    REGISTRATION = "registration"
    REGISTRATION_LIMIT = "registration_limit"
    REGISTRATION_DTYPE = "registration_dtype"
    PROFILE_MISMATCH = "profile_mismatch"
    NON_FINITE = "non_finite"
    BAD_LABEL = "bad_label"
    BUSY = "busy"
    INTERNAL = "internal"


ERROR_CODES: dict[ErrorCode, str] = {
    ErrorCode.MALFORMED: "not a valid message of this spec: msgpack, envelope (`v`, `k`, `ct`), body fields, "
                         "arrays, modality names, chunks",
    ErrorCode.SENDER_MISMATCH: "the envelope's `s` is not the device the topic names",
    ErrorCode.UNREGISTERED: "features or infer from a device the edge has no registration of: register again",
    ErrorCode.REGISTRATION: "a registration the edge cannot serve: no modality it can use, `device` not the "
                            "topic's, registry full",
    ErrorCode.REGISTRATION_LIMIT: "a registration announcing more than the edge accepts (tokens, elements, entries)",
    ErrorCode.REGISTRATION_DTYPE: "a registration giving a modality the edge uses a dtype that is not a float",
    ErrorCode.PROFILE_MISMATCH: "a record that does not fit the agreement: modality not in `config`, shape, "
                                "non-float dtype, `device` not the topic's",
    ErrorCode.NON_FINITE: "a record with NaN or infinite values, or values beyond float32's range",
    ErrorCode.BAD_LABEL: "a `label` outside the model's classes",
    ErrorCode.BUSY: "an inference request shed because the edge's queue is full: retry later under a new `n`",
    ErrorCode.INTERNAL: "the edge failed on this message (a bug on its side)",
}
"""What each code means, as ``docs/wire/SPEC.md`` §3 tables it."""


class FeedbackMessage(StrEnum):
    """The ``message`` of a ``feedback`` downlink: what the edge did with the round the metrics describe."""

    GLOBAL = "global"
    VIEW = "view"
    FEEDBACK = "feedback"


FEEDBACK_MESSAGES: dict[FeedbackMessage, str] = {
    FeedbackMessage.GLOBAL: "the edge now serves the global model of `global_version` (at its own rank)",
    FeedbackMessage.VIEW: "the edge now serves its site's view of `global_version` (cut or fitted for it)",
    FeedbackMessage.FEEDBACK: "the cloud's statistics of `global_version`; the model serving you did not change",
}
"""What each feedback ``message`` means, as ``docs/wire/SPEC.md`` §3 tables it."""


@slotted_dataclass()
class ErrorReport:
    """Why a message from a device was rejected: ``code`` is an :class:`ErrorCode` value, ``ref`` the seq (``n``)
    of the rejected envelope (absent when none could be read)."""

    code: str
    message: str
    ref: int | None = None

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.ref is not None:
            body["ref"] = int(self.ref)
        return body

    @classmethod
    def from_body(cls, body: Any) -> ErrorReport:
        b = body_map(body, "error")
        return cls(
            code=get_str(b, "code"),  # type: ignore[arg-type]
            message=get_str(b, "message"),  # type: ignore[arg-type]
            ref=get_int(b, "ref", optional=True),
        )
