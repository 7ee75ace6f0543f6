"""Text -> ``[tokens, 384]`` float32 features on the device: MiniLM on onnxruntime, tokenized by ``tokenizers``.

The edge's ``text`` modality is configured with ``token_dim`` 384 (MiniLM's hidden size) and takes the
encoder's contextual token states as its tokens, projected by the edge's own learned modality
projection; the device never needs torch or transformers. Pooling (numpy, after the ONNX model):

* ``tokens`` (default): the states of the text's first ``max_tokens`` word pieces ([CLS]/[SEP] left out;
  the edge adds its own CLS). Only those pieces plus the two specials are encoded, so cost is bounded.
* ``chunks``: the whole text (up to ``max_length`` pieces) in ``min(pieces, max_tokens)`` contiguous chunks,
  each mean-pooled: a long text still fits ``max_tokens`` tokens, in order.
* ``mean``: one token, all-MiniLM-L6-v2's sentence embedding (mean over every position, L2-normalized).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from broker.wire import ModalityProfile
from device_sdk.extractors.bundle import (
    EXTRA_HINT,
    ExtractorDependencyError,
    ExtractorFileError,
    ExtractorInputError,
    load_entry,
    open_session,
)

POOLINGS = ("tokens", "chunks", "mean")


class TextEncoder:
    """MiniLM text features for one modality; build the files with ``megace extractors build``."""

    def __init__(self, model: Path, tokenizer: Path, *, token_dim: int, max_tokens: int, max_length: int = 256,
                 pooling: str = "tokens", modality: str = "text", threads: int = 1) -> None:
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if max_tokens < 1 or max_length < 3:
            raise ValueError("max_tokens must be >= 1 and max_length >= 3")
        self.token_dim, self.max_tokens, self.max_length = int(token_dim), int(max_tokens), int(max_length)
        self.pooling, self.modality = pooling, modality
        self._tokenizer = _load_tokenizer(Path(tokenizer))
        # tokenizer.json may carry its own padding/truncation (MiniLM's pads to 128): ours is set per call
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        self._lock = threading.Lock()  # truncation is tokenizer state, set per call
        self._session = open_session(Path(model), threads)
        self._inputs = [i.name for i in self._session.get_inputs()]
        width = self._session.get_outputs()[0].shape[-1]
        if sorted(self._inputs) != ["attention_mask", "input_ids", "token_type_ids"] or width != self.token_dim:
            raise ExtractorFileError(f"{model}: not a text encoder of width {self.token_dim} "
                                     f"(inputs {self._inputs}, width {width})")

    @classmethod
    def open(cls, root: Path, name: str = "text", *, threads: int = 1, max_tokens: int | None = None,
             pooling: str | None = None) -> TextEncoder:
        """The text encoder of a bundle, its files checked against the manifest; overrides change the pooling only."""
        entry = load_entry(Path(root), name, "text")
        s = entry.spec
        try:
            files = (entry.files["model"], entry.files["tokenizer"])
            sizes = {"token_dim": int(s["token_dim"]), "max_tokens": int(s["max_tokens"]),
                     "max_length": int(s.get("max_length", 256))}
            built = {"pooling": str(s.get("pooling", "tokens")), "modality": str(s.get("modality", "text"))}
        except (KeyError, TypeError, ValueError) as exc:
            raise ExtractorFileError(f"{root}: extractor {name!r} has an invalid manifest entry ({exc!r})") from None
        if max_tokens is not None:
            sizes["max_tokens"] = max_tokens
        return cls(*files, **sizes, pooling=pooling or built["pooling"], modality=built["modality"], threads=threads)

    def with_pooling(self, pooling: str, max_tokens: int | None = None) -> TextEncoder:
        """The same encoder pooled differently, sharing this one's onnxruntime session (~125 MB of it)."""
        if pooling not in POOLINGS or (max_tokens is not None and max_tokens < 1):
            raise ValueError(f"pooling must be one of {POOLINGS} and max_tokens >= 1")
        other = copy.copy(self)
        other.pooling, other.max_tokens = pooling, int(max_tokens or self.max_tokens)
        return other

    @property
    def shape(self) -> tuple[int, int]:
        """The registered shape: ``(max_tokens, token_dim)``, one token for ``mean``."""
        return (1 if self.pooling == "mean" else self.max_tokens, self.token_dim)

    def profile(self, rate_hz: float = 1.0) -> ModalityProfile:
        """What to register for this modality (``CapabilityProfile.modalities[self.modality]``)."""
        return ModalityProfile(shape=self.shape, dtype="<f4", rate_hz=float(rate_hz))

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids ([CLS] ... [SEP]) as the encoder reads them, truncated for this pooling."""
        return [list(e.ids) for e in self._encode_ids(texts)]

    def hidden_states(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """MiniLM's last hidden states ``[batch, sequence, token_dim]`` and the padding mask ``[batch, sequence]``."""
        return self._states(self._encode_ids(texts))

    def _states(self, encodings: list[Any]) -> tuple[np.ndarray, np.ndarray]:
        length = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(encodings), length), np.int64)
        types = np.zeros_like(ids)
        mask = np.zeros_like(ids)
        for i, e in enumerate(encodings):
            n = len(e.ids)
            ids[i, :n], types[i, :n], mask[i, :n] = e.ids, e.type_ids, 1
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        (states,) = self._session.run(None, {k: feeds[k] for k in self._inputs})
        return np.asarray(states, np.float32), mask.astype(bool)

    def encode(self, text: str) -> np.ndarray:
        """One text -> float32 ``[tokens, token_dim]``, ``1 <= tokens <= shape[0]``: a FeatureRecord's array."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Many texts in one onnxruntime call (padded to the longest); one array per text."""
        encodings = self._encode_ids(texts)
        states, mask = self._states(encodings)
        out = []
        for i, e in enumerate(encodings):
            pieces = states[i, : len(e.ids)][np.asarray(e.special_tokens_mask, bool) == 0]
            if self.pooling == "mean":
                pooled = states[i][mask[i]].mean(axis=0, keepdims=True)
                pooled /= max(float(np.linalg.norm(pooled)), 1e-12)
            elif not len(pieces):
                raise ExtractorInputError(f"text {texts[i]!r} has no word pieces to encode")
            elif self.pooling == "tokens":
                pooled = pieces[: self.max_tokens]
            else:
                parts = np.array_split(pieces, min(len(pieces), self.max_tokens))
                pooled = np.stack([p.mean(axis=0) for p in parts])
            out.append(np.ascontiguousarray(pooled, dtype=np.float32))
        return out

    def _encode_ids(self, texts: Sequence[str]) -> list[Any]:
        if isinstance(texts, str) or not texts or not all(isinstance(t, str) for t in texts):
            raise ExtractorInputError("texts must be a non-empty sequence of str")
        length = min(self.max_length, self.max_tokens + 2) if self.pooling == "tokens" else self.max_length
        with self._lock:
            self._tokenizer.enable_truncation(length)
            return list(self._tokenizer.encode_batch(list(texts)))


def _load_tokenizer(path: Path) -> Any:
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise ExtractorDependencyError(f"the text encoder needs tokenizers: {EXTRA_HINT}") from exc
    if not path.is_file():
        raise ExtractorFileError(f"{path}: missing tokenizer")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
        raise ExtractorFileError(f"{path}: not a tokenizers tokenizer.json ({exc})") from exc
