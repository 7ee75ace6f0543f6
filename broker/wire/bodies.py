"""Which message class a given envelope kind carries, so receivers decode bodies in one call, and how a site
feedback gives its view (:class:`FeedbackView`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from broker.errors import DecodeError, UnknownKindError
from broker.wire.adapters import AdapterUpdate, GlobalAdapter, SiteFeedback
from broker.wire.batch import FeatureBatch
from broker.wire.device import (
    CapabilityProfile,
    DeviceConfig,
    DeviceFeedback,
    ErrorReport,
    FeatureRecord,
    Prediction,
)
from broker.wire.envelope import Envelope, Kind
from broker.wire.fields import body_map, check_modality, get_list, get_map, get_str
from broker.wire.model import ModelUpdate
from broker.wire.receipt import Receipt
from broker.wire.requests import RegisterRequest

BODY_TYPES: dict[Kind, Any] = {
    Kind.FEATURES: FeatureRecord,
    Kind.FEATURES_BATCH: FeatureBatch,
    Kind.INFER: FeatureRecord,
    Kind.REGISTER: CapabilityProfile,
    Kind.CONFIG: DeviceConfig,
    Kind.PREDICTION: Prediction,
    Kind.FEEDBACK: DeviceFeedback,
    Kind.ERROR: ErrorReport,
    Kind.ADAPTER: AdapterUpdate,
    Kind.GLOBAL: GlobalAdapter,
    Kind.SITE_FEEDBACK: SiteFeedback,
    Kind.MODEL: ModelUpdate,
    Kind.REGISTER_REQUEST: RegisterRequest,
    Kind.RECEIPT: Receipt,
}


def decode_body(env: Envelope) -> Any:
    """The typed message inside ``env`` (a ``MODEL`` body is a :class:`ModelUpdate`, its file in ``data``)."""
    cls = BODY_TYPES.get(env.kind)
    if cls is None:
        raise UnknownKindError(f"no message type for kind {env.kind.value!r}")
    return cls.from_body(env.body)


VIEW_TENSORS = "tensors"
"""``site_feedback.view``: the ``tensors`` field is the site's view of ``version``."""
VIEW_GLOBAL = "global"
"""``site_feedback.view``: the site cuts its view of ``version`` from the retained global itself (``cut``)."""
VIEW_NONE = "none"
"""``site_feedback.view``: no view in this message (an acknowledgement of an upload, or a site with no profile)."""
VIEW_FACTORS = ("AB", "A", "B")
"""``cut.factors``: which LoRA factors the view holds (a rule that keeps B at the edge shares only A)."""


@dataclass(frozen=True)
class FeedbackView:
    """How a ``site_feedback`` body gives its site the view of ``version``: the additive ``view`` and ``cut`` fields.

    Why: every edge already receives the retained global, and a site's view is usually a cut of it, so the cloud
    names the cut rather than sending the same tensors again (docs/wire/SPEC.md, "Site feedback"). A body without
    ``view`` (an older cloud) means ``tensors`` when it carries tensors and ``none`` otherwise.
    """

    mode: str = VIEW_NONE
    modalities: tuple[str, ...] | None = None
    """With ``global``: the modalities whose tensors the view keeps (None: all)."""
    factors: str = "AB"

    def add_to(self, body: dict[str, Any]) -> dict[str, Any]:
        """``body`` (a ``SiteFeedback.to_body()``) with this view's fields appended."""
        body["view"] = self.mode
        if self.mode == VIEW_GLOBAL:
            cut: dict[str, Any] = {"factors": self.factors}
            if self.modalities is not None:
                cut["modalities"] = list(self.modalities)
            body["cut"] = cut
        return body

    @classmethod
    def of(cls, body: Any) -> FeedbackView:
        """The view a ``site_feedback`` body gives (validated: a cut names known factors and carries no tensors)."""
        b = body_map(body, "site_feedback")
        mode = get_str(b, "view", optional=True)
        has_tensors = bool(get_map(b, "tensors", optional=True))
        if mode is None:
            return cls(VIEW_TENSORS if has_tensors else VIEW_NONE)
        if mode not in (VIEW_TENSORS, VIEW_GLOBAL, VIEW_NONE):
            raise DecodeError(f"unknown view {mode!r}; expected tensors, global or none")
        if mode != VIEW_TENSORS and has_tensors:
            raise DecodeError(f"a site_feedback with view {mode!r} carries no tensors")
        if mode != VIEW_GLOBAL:
            return cls(mode)
        cut = body_map(b.get("cut"), "cut")
        factors = get_str(cut, "factors")
        if factors not in VIEW_FACTORS:
            raise DecodeError(f"cut factors must be one of {VIEW_FACTORS}, got {factors!r}")
        if cut.get("modalities") is None:
            return cls(VIEW_GLOBAL, None, factors)
        return cls(VIEW_GLOBAL, tuple(check_modality(m) for m in get_list(cut, "modalities")), factors)
