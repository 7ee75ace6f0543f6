"""A model that passed every check, bound to its graph: how each graph input is fed from a record.

Kept apart from the store (:mod:`device_sdk.local_model`): this is the part that touches onnxruntime's
session and numpy per prediction; the store decides which model is trusted and kept on disk.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from broker.wire.arrays import as_ndarray, numpy
from device_sdk.model_errors import ModelInputError, ModelShapeError

if TYPE_CHECKING:
    import numpy as np

PRESENCE_NAMES = ("presence", "present", "modality_mask")


def onnxruntime_module() -> Any:
    """onnxruntime, imported on first use (``import device_sdk`` must stay light), with a clear error without it."""
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("local models need onnxruntime: pip install 'megace-device-sdk[local]'") from exc
    return onnxruntime


class LoadedModel:
    """A model that passed every check: its session and how each graph input is fed."""

    def __init__(self, meta: dict[str, Any], session: Any) -> None:
        self.meta = meta
        self.version = int(meta["model_version"])
        self.inputs: dict[str, tuple[int, int]] = {m: (int(s[0]), int(s[1])) for m, s in meta["inputs"].items()}
        self.classes = int(meta["classes"])
        self.session = session
        self.order = sorted(self.inputs)
        self.feeds: list[tuple[str, str, str, Any]] = []  # (input name, role, modality, wire dtype)
        self.output = ""
        self._bind(list(meta["input_names"]))

    def _bind(self, announced: list[str]) -> None:
        np = numpy()
        graph = {i.name: i for i in self.session.get_inputs()}
        if set(graph) != set(announced):
            raise ModelShapeError(f"the graph's inputs {sorted(graph)} are not the announced {sorted(announced)}")
        seen = set()
        for name, node in graph.items():
            role, modality = _role(name, self.order)
            dtype = _DTYPES.get(node.type)
            shape = list(node.shape)
            if role == "features":
                want: list[Any] = [None, *self.inputs[modality]]
                ok = dtype == "<f4"
                seen.add(modality)
            elif role == "mask":
                want, ok = [None, self.inputs[modality][0]], dtype is not None
            else:
                want, ok = [None, len(self.order)], dtype is not None
            if not ok or len(shape) != len(want) or any(isinstance(s, int) and w is not None and s != w
                                                        for s, w in zip(shape, want)):  # noqa: B905 (3.9)
                raise ModelShapeError(f"input {name!r} is {node.type} {shape}; the model announces {role} {want}")
            self.feeds.append((name, role, modality, dtype))
        if seen != set(self.order):
            raise ModelShapeError(f"no graph input for modalities {sorted(set(self.order) - seen)}")
        outputs = self.session.get_outputs()
        last = outputs[0].shape[-1] if outputs and outputs[0].shape else None
        if not outputs or len(outputs[0].shape) != 2 or (isinstance(last, int) and last != self.classes):
            raise ModelShapeError(f"output 0 must be [batch, {self.classes}] probabilities")
        self.output = outputs[0].name
        trial = {m: np.zeros(self.inputs[m], np.float32) for m in self.order[:1]}
        try:
            probs = self.run(trial)
        except ModelInputError as exc:  # pragma: no cover - zeros always fit
            raise ModelShapeError(str(exc)) from None
        except Exception as exc:
            raise ModelShapeError(f"the model fails on a trial input: {type(exc).__name__}: {exc}") from None
        if probs.shape != (self.classes,) or not np.isfinite(probs).all():
            raise ModelShapeError(f"the model gives {probs.shape} on a trial input, not {self.classes} finite values")

    def run(self, modalities: Mapping[str, Any]) -> np.ndarray:
        """Class probabilities for one sample (``modality -> [tokens, token_dim]`` or ``[token_dim]``)."""
        np = numpy()
        unknown = set(modalities) - set(self.inputs)
        if unknown:
            raise ModelInputError(f"the local model does not read {sorted(unknown)} (it reads {self.order})")
        tokens: dict[str, np.ndarray] = {}
        for m, value in modalities.items():
            arr = as_ndarray(value).astype(np.float32, copy=False)  # numpy arrays and plain buffers
            arr = arr[None, :] if arr.ndim == 1 else arr
            t, d = self.inputs[m]
            if arr.ndim != 2 or arr.shape[1] != d or arr.shape[0] < 1:
                raise ModelInputError(f"modality {m!r}: shape {np.shape(value)}, the model takes [tokens, {d}]")
            if not np.isfinite(arr).all():
                raise ModelInputError(f"modality {m!r} contains NaN or infinite values")
            tokens[m] = arr[-t:]  # the newest max_tokens, as the edge keeps them
        if not tokens:
            raise ModelInputError(f"a record needs at least one of {self.order}")
        feed: dict[str, np.ndarray] = {}
        for name, role, m, dtype in self.feeds:
            if role == "features":
                x = np.zeros((1,) + self.inputs[m], np.float32)
                if m in tokens:
                    x[0, : len(tokens[m])] = tokens[m]
            elif role == "mask":
                x = np.zeros((1, self.inputs[m][0]), dtype)
                x[0, : len(tokens.get(m, ()))] = 1
            else:
                x = np.array([[m2 in tokens for m2 in self.order]]).astype(dtype)
            feed[name] = x
        return np.asarray(self.session.run([self.output], feed)[0], dtype=np.float32)[0]


_DTYPES = {"tensor(float)": "<f4", "tensor(bool)": "|b1", "tensor(int64)": "<i8", "tensor(int32)": "<i4"}
"""onnxruntime's input types to the numpy dtypes (by wire name) fed to them."""


def _role(name: str, modalities: list[str]) -> tuple[str, str]:
    """Which feed a graph input is: ``m``/``features.m``/``features_m`` (features), ``m_mask``/``token_mask.m``/
    ``mask_m`` (token mask of ``m``), or ``presence`` ([batch, modalities in sorted order])."""
    if name in PRESENCE_NAMES:
        return "presence", ""
    for m in sorted(modalities, key=len, reverse=True):
        if name in (m, f"features.{m}", f"features_{m}", f"{m}_features", f"features/{m}"):
            return "features", m
        if name in (f"{m}_mask", f"mask_{m}", f"mask.{m}", f"token_mask.{m}", f"token_mask_{m}", f"token_mask/{m}"):
            return "mask", m
    raise ModelShapeError(f"graph input {name!r} is neither a modality's features or mask nor presence")
