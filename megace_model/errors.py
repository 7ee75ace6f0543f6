"""Typed errors of the edge model layer.

Everything the service may receive from outside (samples, global adapters,
checkpoints on disk) is validated before it touches the model, and a failure
raises one of these so the receiving loop can count it by class name and go on.
"""

from __future__ import annotations


class EdgeModelError(Exception):
    """Base class of every error raised by ``megace_model`` / ``edge_agent.training``."""


class ConfigError(EdgeModelError, ValueError):
    """An ``EdgeModelConfig`` is inconsistent (bad modality name, sequence too long, ...)."""


class SampleError(EdgeModelError, ValueError):
    """A sample cannot be collated (unknown modality, wrong token dim, NaN features, bad label)."""


class AdapterMismatchError(EdgeModelError, ValueError):
    """Shared adapter tensors do not fit this model (unknown/missing names, wrong shapes)."""


class NonFiniteAdapterError(AdapterMismatchError):
    """Shared adapter tensors contain NaN or infinite values."""


class BaseMismatchError(AdapterMismatchError):
    """An adapter or checkpoint was made for a different frozen base (fingerprint differs)."""


class CheckpointError(EdgeModelError):
    """A checkpoint on disk is missing, truncated, corrupt or belongs to another model."""


class InsufficientDataError(EdgeModelError):
    """A training round was requested but the replay buffer holds no trainable sample."""
