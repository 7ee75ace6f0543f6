"""Open an extractor bundle (``megace extractors build``): manifest, sha256-checked files, onnxruntime sessions.

A device must never run a truncated or swapped model and then publish features the edge cannot tell are
wrong, so every file is checked against the manifest's sha256 before onnxruntime sees it, and every way
a bundle can be unusable raises a typed :class:`ExtractorFileError` that names the file. onnxruntime is
imported only when a session is made: ``import device_sdk`` stays light (paho, msgpack, numpy).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_sdk.files import sha256_file

MANIFEST = "manifest.json"
FORMAT = "megace-extractors"
FORMAT_VERSION = 1
EXTRA_HINT = "pip install 'megace-device-sdk[extractors]'"


class ExtractorError(Exception):
    """Base class of the extractors' errors."""


class ExtractorFileError(ExtractorError):
    """The bundle cannot be used: a file is missing, unreadable, corrupt, or not what the manifest says."""


class ExtractorDependencyError(ExtractorError, ImportError):
    """onnxruntime or tokenizers is not installed (the SDK's ``extractors`` extra)."""


class ExtractorInputError(ExtractorError, ValueError):
    """The raw input cannot become features of the registered shape (wrong shape, empty text, non-finite)."""


@dataclass(frozen=True)
class ExtractorEntry:
    """One extractor of a bundle: its manifest entry and its files' verified paths."""

    name: str
    spec: dict[str, Any]
    files: dict[str, Path]
    """Role (``model``, ``tokenizer``) -> file in the bundle, sha256 already checked."""


def read_manifest(root: Path) -> dict[str, Any]:
    """The bundle's manifest, checked for format and version."""
    path = Path(root) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExtractorFileError(f"no {MANIFEST} in {root}: build the bundle with `megace extractors build`") from None
    except (OSError, ValueError) as exc:
        raise ExtractorFileError(f"{path}: unreadable manifest ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExtractorFileError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise ExtractorFileError(f"{path}: manifest version {manifest.get('version')!r}, "
                                 f"this SDK reads {FORMAT_VERSION}")
    if not isinstance(manifest.get("extractors"), dict) or not isinstance(manifest.get("files"), dict):
        raise ExtractorFileError(f"{path}: manifest lacks 'extractors' or 'files'")
    return manifest


def load_entry(root: Path, name: str, kind: str) -> ExtractorEntry:
    """Extractor ``name`` of the bundle in ``root``, of ``kind``, with every file it uses checked (sha256, size)."""
    root = Path(root)
    manifest = read_manifest(root)
    spec = manifest["extractors"].get(name)
    if not isinstance(spec, dict):
        raise ExtractorFileError(f"{root}: no extractor {name!r}; the bundle has {sorted(manifest['extractors'])}")
    if spec.get("kind") != kind:
        raise ExtractorFileError(f"{root}: extractor {name!r} is a {spec.get('kind')!r}, not a {kind!r}")
    if not isinstance(spec.get("files"), dict):
        raise ExtractorFileError(f"{root}: extractor {name!r} lists no files")
    files: dict[str, Path] = {}
    for role, filename in spec["files"].items():
        expected = manifest["files"].get(filename)
        path = root / str(filename)
        if not isinstance(expected, dict) or Path(str(filename)).name != filename:
            raise ExtractorFileError(f"{root}: manifest lists no checksum for {filename!r}")
        try:
            size = path.stat().st_size
        except OSError:
            raise ExtractorFileError(f"{path}: missing ({name!r} needs it as its {role})") from None
        if size != expected.get("bytes"):
            raise ExtractorFileError(f"{path}: {size} bytes, the manifest says {expected.get('bytes')} (truncated?)")
        if sha256_file(path) != expected.get("sha256"):
            raise ExtractorFileError(f"{path}: sha256 differs from the manifest (corrupt or replaced)")
        files[role] = path
    return ExtractorEntry(name, spec, files)


def open_session(path: Path, threads: int = 1) -> Any:
    """An onnxruntime CPU session on ``path``; a file onnxruntime cannot load is an :class:`ExtractorFileError`."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ExtractorDependencyError(f"the feature extractors need onnxruntime: {EXTRA_HINT}") from exc
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(0, int(threads))  # 1 by default: a gateway runs other work beside
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if not Path(path).is_file():
        raise ExtractorFileError(f"{path}: missing ONNX model")
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf/RuntimeError types
        raise ExtractorFileError(f"{path}: onnxruntime cannot load it ({type(exc).__name__}: {exc})") from exc
