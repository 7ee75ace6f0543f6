"""The ``model`` downlink: an exported inference model an edge sends a device that asked to predict locally.

Why a structured body and not raw bytes: a device must be able to refuse what it cannot run before it
writes or loads anything. The body says which version it is (devices only move forward), which format,
the sha256 of the file (checked against the bytes before anything else), and the input layout the model
takes (``inputs``: modality -> ``[max_tokens, token_dim]``) so the device can check it against its own
registered profile. The file itself is ``data``; a big model travels chunked (SPEC §4) and, when the edge
signs, the signature covers the whole envelope (verified after reassembly).
"""

from __future__ import annotations

from typing import Any

from broker.compat import slotted_dataclass
from broker.errors import DecodeError, OversizeError
from broker.wire.fields import body_map, check_modality, get_int, get_list, get_map, get_str

MODEL_FORMATS = ("onnx",)
"""The formats a ``model`` body may carry."""
MAX_MODEL_BYTES = 256 * 1024 * 1024
"""Largest model file accepted (a MiniLM classifier in ONNX is about 90 MB)."""
MAX_MODEL_INPUTS = 64
"""Most modalities (``inputs``) and graph inputs (``input_names``) one model may list."""
MAX_INPUT_NAME = 128
MAX_TOKENS = 4096
MAX_TOKEN_DIM = 65_536
MAX_CLASSES = 65_536
MAX_VERSION = 2**63 - 1


@slotted_dataclass()
class ModelUpdate:
    """Body of a ``model`` downlink: ``{model_version, format, sha256, classes, inputs, input_names, data}``.

    ``sha256`` is the 32-byte digest of ``data`` (a receiver checks it, the codec does not: a mismatch is the
    device's typed refusal, not a malformed message); ``inputs`` maps each modality the model reads to
    ``(max_tokens, token_dim)``; ``input_names`` are the graph's input names (features, masks, presence).
    """

    model_version: int
    sha256: bytes
    inputs: dict[str, tuple[int, int]]
    input_names: list[str]
    classes: int
    data: bytes
    format: str = "onnx"

    def to_body(self) -> dict[str, Any]:
        return {
            "model_version": int(self.model_version),
            "format": self.format,
            "sha256": bytes(self.sha256),
            "classes": int(self.classes),
            "inputs": {check_modality(m): [int(t), int(d)] for m, (t, d) in sorted(self.inputs.items())},
            "input_names": [str(n) for n in self.input_names],
            "data": self.data,
        }

    @classmethod
    def from_body(cls, body: Any, *, max_bytes: int = MAX_MODEL_BYTES) -> ModelUpdate:
        """Every field type-checked and bounded; any failure is a ``WireError`` (``DecodeError``, ``OversizeError``)."""
        b = body_map(body, "model")
        version = get_int(b, "model_version")
        assert version is not None
        if version > MAX_VERSION:
            raise DecodeError(f"model_version {version} is out of range (0 <= v < 2^63)")
        fmt = get_str(b, "format")
        if fmt not in MODEL_FORMATS:
            raise DecodeError(f"unknown model format {fmt!r}; expected one of {list(MODEL_FORMATS)}")
        digest = b.get("sha256")
        if not isinstance(digest, bytes) or len(digest) != 32:
            raise DecodeError("field 'sha256' must be 32 bytes (bin)")
        classes = get_int(b, "classes", minimum=1)
        assert classes is not None
        if classes > MAX_CLASSES:
            raise DecodeError(f"classes {classes} exceeds {MAX_CLASSES}")
        data = b.get("data")
        if not isinstance(data, bytes) or not data:
            raise DecodeError("field 'data' must be non-empty bytes (bin)")
        if len(data) > max_bytes:
            raise OversizeError(f"model of {len(data)} bytes exceeds the limit of {max_bytes}")
        return cls(model_version=version, sha256=digest, inputs=_inputs(get_map(b, "inputs")),
                   input_names=_names(get_list(b, "input_names")), classes=classes, data=data, format=fmt)

    def fit_error(self, profile: Any) -> str | None:
        """Why this model cannot serve a device registered with ``profile`` (a ``CapabilityProfile``), or None.

        The rule the edge (before sending) and the device (before installing) both apply: the model reads at
        least one modality the device registered, and for every such modality the registered last dimension is
        the model's ``token_dim`` (a longer registered sequence is fine: the newest ``max_tokens`` are used).
        """
        shared = sorted(set(self.inputs) & set(profile.modalities))
        if not shared:
            return f"the model reads {sorted(self.inputs)}, the device registered {sorted(profile.modalities)}"
        for m in shared:
            registered = tuple(profile.modalities[m].shape)
            if len(registered) > 2 or registered[-1] != self.inputs[m][1]:
                return f"modality {m!r}: registered {registered}, the model takes tokens of width {self.inputs[m][1]}"
        return None


def _inputs(raw: dict[str, Any]) -> dict[str, tuple[int, int]]:
    if not raw:
        raise DecodeError("field 'inputs' must name at least one modality")
    if len(raw) > MAX_MODEL_INPUTS:
        raise DecodeError(f"field 'inputs' lists more than {MAX_MODEL_INPUTS} modalities")
    out: dict[str, tuple[int, int]] = {}
    for name, shape in raw.items():
        check_modality(name)
        if (not isinstance(shape, list) or len(shape) != 2
                or any(type(d) is not int or d < 1 for d in shape)
                or shape[0] > MAX_TOKENS or shape[1] > MAX_TOKEN_DIM):
            raise DecodeError(f"inputs[{name!r}] must be [tokens, token_dim] with 1 <= tokens <= {MAX_TOKENS} and "
                              f"1 <= token_dim <= {MAX_TOKEN_DIM}, got {shape!r}")
        out[name] = (shape[0], shape[1])
    return out


def _names(raw: list[Any]) -> list[str]:
    if not 1 <= len(raw) <= MAX_MODEL_INPUTS:
        raise DecodeError(f"field 'input_names' must list 1 to {MAX_MODEL_INPUTS} names")
    if any(not isinstance(n, str) or not 1 <= len(n) <= MAX_INPUT_NAME for n in raw):
        raise DecodeError(f"field 'input_names' must hold strings of 1 to {MAX_INPUT_NAME} characters")
    if len(set(raw)) != len(raw):
        raise DecodeError("field 'input_names' repeats a name")
    return list(raw)
