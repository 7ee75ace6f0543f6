"""Configuration of the edge multimodal model.

The config is the single source of truth for the frozen base: every edge and
the cloud build bit-identical frozen weights from it (see ``fingerprint``).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from megace_model.errors import ConfigError

Backbone = Literal["tiny", "minilm"]

_MODALITY_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
#: Hidden size of each backbone, known without building it.
BACKBONE_HIDDEN: dict[str, int] = {"tiny": 128, "minilm": 384}
#: Longest sequence (CLS + all modality tokens) each backbone accepts.
BACKBONE_MAX_POSITIONS: dict[str, int] = {"tiny": 128, "minilm": 512}


@dataclass(frozen=True)
class ModalitySpec:
    """One modality arrives as float features of shape ``(tokens, token_dim)`` or ``(token_dim,)``."""

    token_dim: int
    max_tokens: int = 1


@dataclass(frozen=True)
class EdgeModelConfig:
    """Everything that defines the model; JSON round-trips via ``to_dict``/``from_dict``.

    Modalities are always processed in sorted name order so that two configs
    listing the same modalities in a different order build the same model.
    """

    modalities: dict[str, ModalitySpec]
    num_classes: int
    backbone: Backbone = "tiny"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    contrastive_weight: float = 0.0
    contrastive_temperature: float = 0.1
    cross_modal_heads: int = 4
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def modality_names(self) -> tuple[str, ...]:
        """Canonical (sorted) modality order used for presence masks and sequence layout."""
        return tuple(sorted(self.modalities))

    @property
    def hidden_size(self) -> int:
        return BACKBONE_HIDDEN[self.backbone]

    @property
    def sequence_length(self) -> int:
        """CLS token plus every modality's maximum token count."""
        return 1 + sum(spec.max_tokens for spec in self.modalities.values())

    def validate(self) -> None:
        """Raise ``ConfigError`` early instead of failing deep inside torch."""
        if self.backbone not in BACKBONE_HIDDEN:
            raise ConfigError(f"unknown backbone {self.backbone!r}; expected one of {sorted(BACKBONE_HIDDEN)}")
        if not self.modalities:
            raise ConfigError("at least one modality is required")
        for name, spec in self.modalities.items():
            if not isinstance(spec, ModalitySpec):
                raise ConfigError(f"modality {name!r}: expected ModalitySpec, got {type(spec).__name__}")
            if not _MODALITY_NAME.match(name):
                raise ConfigError(f"modality name {name!r} must match {_MODALITY_NAME.pattern}")
            if spec.token_dim < 1 or spec.max_tokens < 1:
                raise ConfigError(f"modality {name!r}: token_dim and max_tokens must be >= 1")
        if self.num_classes < 2:
            raise ConfigError("num_classes must be >= 2")
        if self.lora_r < 1 or self.lora_alpha <= 0:
            raise ConfigError("lora_r must be >= 1 and lora_alpha > 0")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError("lora_dropout must be in [0, 1)")
        if self.contrastive_weight < 0 or self.contrastive_temperature <= 0:
            raise ConfigError("contrastive_weight must be >= 0 and contrastive_temperature > 0")
        if self.hidden_size % self.cross_modal_heads:
            raise ConfigError(f"hidden size {self.hidden_size} not divisible by cross_modal_heads")
        if self.sequence_length > BACKBONE_MAX_POSITIONS[self.backbone]:
            raise ConfigError(
                f"sequence length {self.sequence_length} exceeds {self.backbone} limit "
                f"{BACKBONE_MAX_POSITIONS[self.backbone]}; lower max_tokens"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (modalities become plain dicts)."""
        data = asdict(self)
        data["modalities"] = {name: asdict(spec) for name, spec in sorted(self.modalities.items())}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EdgeModelConfig:
        """Inverse of ``to_dict``; unknown keys raise ``ConfigError``."""
        try:
            fields = dict(data)
            fields["modalities"] = {name: ModalitySpec(**spec) for name, spec in dict(fields["modalities"]).items()}
            return cls(**fields)
        except (TypeError, KeyError) as exc:
            raise ConfigError(f"invalid config dict: {exc}") from exc
