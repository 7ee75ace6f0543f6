"""Which message class a given envelope kind carries, so receivers decode bodies in one call."""

from __future__ import annotations

from typing import Any

from broker.errors import UnknownKindError
from broker.wire.adapters import AdapterUpdate, GlobalAdapter, SiteFeedback
from broker.wire.device import (
    CapabilityProfile,
    DeviceConfig,
    DeviceFeedback,
    ErrorReport,
    FeatureRecord,
    Prediction,
)
from broker.wire.envelope import Envelope, Kind

BODY_TYPES: dict[Kind, Any] = {
    Kind.FEATURES: FeatureRecord,
    Kind.INFER: FeatureRecord,
    Kind.REGISTER: CapabilityProfile,
    Kind.CONFIG: DeviceConfig,
    Kind.PREDICTION: Prediction,
    Kind.FEEDBACK: DeviceFeedback,
    Kind.ERROR: ErrorReport,
    Kind.ADAPTER: AdapterUpdate,
    Kind.GLOBAL: GlobalAdapter,
    Kind.SITE_FEEDBACK: SiteFeedback,
}


def decode_body(env: Envelope) -> Any:
    """The typed message inside ``env`` (``MODEL`` bodies are raw bytes, e.g. an ONNX file)."""
    if env.kind is Kind.MODEL:
        if not isinstance(env.body, bytes):
            raise UnknownKindError("a model body must be binary")
        return env.body
    cls = BODY_TYPES.get(env.kind)
    if cls is None:
        raise UnknownKindError(f"no message type for kind {env.kind.value!r}")
    return cls.from_body(env.body)
