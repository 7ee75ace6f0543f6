"""megace device SDK: publish multimodal features from an IoT gateway (paho-mqtt + msgpack, no torch)."""

from broker.address import BrokerAddress
from broker.wire import (
    CapabilityProfile,
    DeviceConfig,
    DeviceFeedback,
    ErrorReport,
    FeatureRecord,
    Kind,
    ModalityProfile,
    Prediction,
)
from device_sdk.client import DeviceClient
from device_sdk.store import Overflow, QueueFullError

__all__ = [
    "BrokerAddress",
    "CapabilityProfile",
    "DeviceClient",
    "DeviceConfig",
    "DeviceFeedback",
    "ErrorReport",
    "FeatureRecord",
    "Kind",
    "ModalityProfile",
    "Overflow",
    "Prediction",
    "QueueFullError",
]
