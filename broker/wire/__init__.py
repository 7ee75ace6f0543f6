"""The wire format: msgpack envelopes and the message bodies inside them (JSON for status/metrics)."""

from broker.wire.adapters import AdapterUpdate, GlobalAdapter, Rejection, SiteFeedback, modality_of
from broker.wire.arrays import DTYPES, decode_array, encode_array
from broker.wire.batch import MAX_BATCH_BYTES, MAX_BATCH_RECORDS, FeatureBatch
from broker.wire.device import (
    CapabilityProfile,
    DeviceConfig,
    DeviceFeedback,
    ErrorCode,
    ErrorReport,
    FeatureRecord,
    FeedbackMessage,
    ModalityProfile,
    Prediction,
)
from broker.wire.envelope import Envelope, Kind, decode_envelope, encode_envelope
from broker.wire.model import ModelUpdate
from broker.wire.receipt import Receipt
from broker.wire.requests import RegisterRequest
from broker.wire.status import Status, decode_metrics, metrics_payload

__all__ = [
    "DTYPES",
    "MAX_BATCH_BYTES",
    "MAX_BATCH_RECORDS",
    "AdapterUpdate",
    "CapabilityProfile",
    "DeviceConfig",
    "DeviceFeedback",
    "Envelope",
    "ErrorCode",
    "ErrorReport",
    "FeatureBatch",
    "FeatureRecord",
    "FeedbackMessage",
    "GlobalAdapter",
    "Kind",
    "ModalityProfile",
    "ModelUpdate",
    "Prediction",
    "Receipt",
    "RegisterRequest",
    "Rejection",
    "SiteFeedback",
    "Status",
    "decode_array",
    "decode_envelope",
    "decode_metrics",
    "encode_array",
    "encode_envelope",
    "metrics_payload",
    "modality_of",
]
