"""Why a device refuses a model: one typed error per check, each counted as ``model_rejected.<reason>``.

Its own module because the store (:mod:`device_sdk.local_model`) and the runner
(:mod:`device_sdk.model_runner`) both raise them, and firmware catches them by class.
"""

from __future__ import annotations

from broker.errors import WireError


class ModelRejectedError(WireError):
    """A model the device will not use; ``reason`` names the check (counted as ``model_rejected.<reason>``)."""

    reason = "rejected"


class ModelFormatError(ModelRejectedError):
    reason = "format"


class StaleModelError(ModelRejectedError):
    reason = "stale"


class ModelHashError(ModelRejectedError):
    reason = "sha256"


class ModelProfileError(ModelRejectedError):
    reason = "profile"


class ModelCorruptError(ModelRejectedError):
    reason = "corrupt"


class ModelShapeError(ModelRejectedError):
    reason = "shape"


class ModelStorageError(ModelRejectedError):
    reason = "storage"


class ModelInputError(ValueError):
    """A record the local model cannot read (modality it does not know, wrong width, non-finite values)."""
