"""From MQTT bytes to a ``Contribution``, with every wire-level failure given a stable reason.

The validator's reasons (``errors.REASONS``) cover what is wrong with an update's *content*;
these cover what is wrong with its *transport* (bad chunk hash, not msgpack, wrong kind), so
the edge's feedback and the metrics can name both with one vocabulary.
"""

from __future__ import annotations

import numpy as np

from broker.errors import (
    ArrayFormatError,
    ChunkError,
    ChunkHashError,
    ChunkLimitError,
    DecodeError,
    OversizeError,
    SchemaVersionError,
    TopicError,
    UnknownKindError,
    UnknownModalityError,
    WireError,
)
from broker.signing import SignatureError, UnknownKeyError, UnsignedError
from broker.wire import AdapterUpdate

from .contribution import Contribution
from .errors import BadMetadata
from .trust import ImpersonationError

WIRE_REASONS: dict[type[WireError], str] = {
    ChunkHashError: "chunk_hash",
    ChunkLimitError: "chunk_limit",
    ChunkError: "bad_chunk",
    OversizeError: "oversize",
    SchemaVersionError: "schema_version",
    UnknownKindError: "wrong_kind",
    ArrayFormatError: "bad_array",
    UnknownModalityError: "bad_modality",
    TopicError: "bad_topic",
    DecodeError: "bad_payload",
    ImpersonationError: "impersonation",
    UnsignedError: "unsigned",
    UnknownKeyError: "unknown_key",
    SignatureError: "bad_signature",
}


def wire_reason(exc: WireError) -> str:
    """The most specific reason for a wire error (subclasses first, via the MRO)."""
    for cls in type(exc).__mro__:
        if cls in WIRE_REASONS:
            return WIRE_REASONS[cls]
    return "bad_payload"


def to_contribution(update: AdapterUpdate) -> Contribution:
    """Copy the (read-only, zero-copy) wire arrays into float32 arrays the cloud owns.

    Non-float arrays are kept as they are so the validator refuses them with a reason.
    """
    tensors: dict[str, np.ndarray] = {}
    for name, arr in update.tensors.items():
        if not isinstance(arr, np.ndarray):
            raise BadMetadata(f"{name}: not an array")
        floating = np.issubdtype(arr.dtype, np.floating)
        tensors[name] = arr.astype(np.float32) if floating else np.array(arr, copy=True)
    return Contribution(
        edge_id=update.edge,
        seq=update.seq,
        base_version=update.base_version,
        rank=update.rank,
        alpha=update.alpha,
        samples=update.samples,
        tensors=tensors,
        modalities=dict(update.modalities),
        fingerprint=update.base_model,
    )
