"""megace device SDK: publish multimodal features from an IoT gateway (paho-mqtt + msgpack, no torch).

Gateways run Python 3.9 and 3.10, so this package and the bus-contract modules it imports ship alone as
the ``megace-device-sdk`` wheel (``sdk/pyproject.toml``; install: README, "Device SDK on gateways"). Keep
them to Python 3.9 (``broker.compat`` has ``StrEnum`` and slotted dataclasses; no ``match``) and to the
standard library, paho-mqtt, msgpack and numpy: ``tests/device_sdk/test_min_python.py`` and
``test_sdk_wheel.py`` fail otherwise.
"""

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
