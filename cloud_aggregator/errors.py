"""Typed rejection reasons.

Every reason an update can be refused is one exception class with a stable ``reason``
string, so the service can count rejections by reason and the ledger can store them,
without ever crashing the receive loop.
"""

from __future__ import annotations

from typing import ClassVar


class RejectedUpdate(Exception):
    """Base of every refusal; ``reason`` is the stable machine-readable string."""

    reason: ClassVar[str] = "rejected"

    def __init__(self, detail: str = "") -> None:
        super().__init__(f"{self.reason}: {detail}" if detail else self.reason)
        self.detail = detail


class FingerprintMismatch(RejectedUpdate):
    reason = "base_fingerprint"


class UnknownTensor(RejectedUpdate):
    reason = "unknown_tensor"


class ShapeMismatch(RejectedUpdate):
    reason = "shape"


class RankMismatch(RejectedUpdate):
    reason = "rank"


class NonFinite(RejectedUpdate):
    reason = "non_finite"


class DuplicateUpdate(RejectedUpdate):
    reason = "duplicate"


class ReplayedUpdate(RejectedUpdate):
    reason = "replayed"


class NormOutlier(RejectedUpdate):
    reason = "norm_outlier"


class DuplicateContent(RejectedUpdate):
    """The same tensors were already accepted from this edge under another seq (a replay with a fresh seq)."""

    reason = "duplicate_content"


class UnknownSite(RejectedUpdate):
    """An allow-list is configured and the site is not on it."""

    reason = "unknown_site"


class StaleUpdate(RejectedUpdate):
    reason = "stale"


class FutureBase(RejectedUpdate):
    """The edge claims a base version the cloud never published."""

    reason = "future_base"


class BadMetadata(RejectedUpdate):
    reason = "bad_metadata"


REASONS: tuple[str, ...] = tuple(
    cls.reason
    for cls in (
        FingerprintMismatch,
        UnknownTensor,
        ShapeMismatch,
        RankMismatch,
        NonFinite,
        DuplicateUpdate,
        ReplayedUpdate,
        NormOutlier,
        DuplicateContent,
        UnknownSite,
        StaleUpdate,
        FutureBase,
        BadMetadata,
    )
)
