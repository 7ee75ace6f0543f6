"""Typed rejections of what devices send the edge.

Each carries a stable ``code`` (an :class:`broker.wire.ErrorCode`, the list the wire spec tables) that goes
into the ``ErrorReport`` on the device's downlink, and its class name is what the agent's metrics count
(``rejected.<Class>``).
"""

from __future__ import annotations

from broker.errors import WireError
from broker.wire import ErrorCode


class IngestError(ValueError):
    """A device message was refused; the agent counts it, tells the device and goes on."""

    code: ErrorCode = ErrorCode.MALFORMED


class SenderMismatchError(IngestError):
    """The envelope's sender ``s`` is not the device the topic names (the identity a broker ACL vouches for)."""

    code = ErrorCode.SENDER_MISMATCH


class UnregisteredDeviceError(IngestError):
    """Features or an inference request from a device that never registered."""

    code = ErrorCode.UNREGISTERED


class RegistrationError(IngestError):
    """A registration the edge cannot serve (no modality in common, id mismatch, registry full)."""

    code = ErrorCode.REGISTRATION


class RegistrationDtypeError(RegistrationError):
    """A registration gives a modality the model uses a non-float dtype: every record of it would be refused,
    so the registration is refused instead, where the device author sees it at once."""

    code = ErrorCode.REGISTRATION_DTYPE


class ProfileMismatchError(IngestError):
    """A record's modalities or shapes differ from the device's registered profile or the model."""

    code = ErrorCode.PROFILE_MISMATCH


class NonFiniteFeaturesError(IngestError):
    """A feature array contains NaN or infinite values."""

    code = ErrorCode.NON_FINITE


class BadLabelError(IngestError):
    """A label outside ``[0, num_classes)``."""

    code = ErrorCode.BAD_LABEL


class BusyError(IngestError):
    """The inference queue is full; the request is shed rather than queued without bound."""

    code = ErrorCode.BUSY


def error_code(exc: BaseException) -> ErrorCode:
    """The code a device is told for ``exc``: the ingest error's own, ``malformed`` for anything the wire
    decoders refused, ``internal`` for the rest (a failure on the edge's side, not the device's)."""
    if isinstance(exc, IngestError):
        return exc.code
    if isinstance(exc, WireError):
        return ErrorCode.MALFORMED
    return ErrorCode.INTERNAL
