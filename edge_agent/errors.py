"""Typed rejections of what devices send the edge.

Each carries a stable ``code`` that goes into the ``ErrorReport`` on the device's
downlink, and its class name is what the agent's metrics count (``rejected.<Class>``).
"""

from __future__ import annotations


class IngestError(ValueError):
    """A device message was refused; the agent counts it, tells the device and goes on."""

    code = "rejected"


class UnregisteredDeviceError(IngestError):
    """Features or an inference request from a device that never registered."""

    code = "unregistered"


class RegistrationError(IngestError):
    """A registration the edge cannot serve (no modality in common, id mismatch, registry full)."""

    code = "registration"


class ProfileMismatchError(IngestError):
    """A record's modalities or shapes differ from the device's registered profile or the model."""

    code = "profile_mismatch"


class NonFiniteFeaturesError(IngestError):
    """A feature array contains NaN or infinite values."""

    code = "non_finite"


class BadLabelError(IngestError):
    """A label outside ``[0, num_classes)``."""

    code = "bad_label"


class BusyError(IngestError):
    """The inference queue is full; the request is shed rather than queued without bound."""

    code = "busy"
