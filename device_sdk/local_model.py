"""On-device inference: the edge's ONNX model, kept on disk, checked before use, run with onnxruntime.

Why: a gateway that holds its edge's model answers in a millisecond without the bus, and keeps answering
while the edge is away. The model arrives as a ``model`` downlink (:class:`broker.wire.model.ModelUpdate`,
SPEC §3); everything about it is checked before it can replace the model in use, in this order: format,
version (only forward), sha256 of the bytes, fit with the device's registered profile, onnxruntime loads it
(a truncated or corrupt file fails here), its graph takes the announced inputs and gives ``classes``
probabilities on a trial run. Only then is it written (temporary file, fsync, ``os.replace``; the small
``current.json`` that names it is replaced the same way, last: it is the commit) and swapped in. Any failure
is a typed :class:`ModelRejectedError` and leaves the model in use, on disk and in memory, as it was.

At start the model ``current.json`` names is loaded if its bytes still hash to the recorded sha256 (else the
previous one is tried): a torn write or an edited file is never loaded. onnxruntime is imported only when a
model is loaded (``pip install megace-device-sdk[local]``): ``import device_sdk`` stays light.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.util
import json
import logging
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker.metrics import Counters
from broker.wire import CapabilityProfile, FeatureRecord, Prediction
from broker.wire.model import ModelUpdate
from device_sdk.files import sha256_file, write_atomic
from device_sdk.model_errors import (
    ModelCorruptError,
    ModelFormatError,
    ModelHashError,
    ModelInputError,
    ModelProfileError,
    ModelRejectedError,
    ModelShapeError,
    ModelStorageError,
    StaleModelError,
)
from device_sdk.model_runner import LoadedModel, onnxruntime_module

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

META = "current.json"


def _meta_of(msg: ModelUpdate) -> dict[str, Any]:
    return {"model_version": msg.model_version, "format": msg.format, "sha256": msg.sha256.hex(),
            "inputs": {m: list(s) for m, s in msg.inputs.items()}, "input_names": list(msg.input_names),
            "classes": msg.classes}


class LocalModel:
    """The device's model store and runner.

    Args:
        model_dir: Where models live (created if missing); keep it on persistent storage.
        profile: The device's registered profile; a model must fit it (see ``ModelUpdate.fit_error``).
        counters: Where ``model_installed``, ``model_unchanged``, rejections (``rejected.<ErrorClass>`` and
            ``model_rejected.<reason>``), disk refusals (``model_disk.<reason>``) and the ``model_version``
            gauge are kept.
        threads: onnxruntime intra-op threads (1: a gateway shares its cores).
    """

    def __init__(self, model_dir: str | Path, profile: CapabilityProfile | None = None, *,
                 counters: Counters | None = None, threads: int = 1) -> None:
        if importlib.util.find_spec("onnxruntime") is None:  # fail at start, not at the first model (not imported)
            raise ImportError("local models need onnxruntime: pip install 'megace-device-sdk[local]'")
        self.dir = Path(model_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.profile = profile
        self.counters = counters if counters is not None else Counters()
        self.threads = threads
        self._lock = threading.Lock()
        self._active: LoadedModel | None = None
        self._load_from_disk()

    @property
    def version(self) -> int | None:
        """The version in use (None: no model; predictions go to the edge)."""
        active = self._active
        return None if active is None else active.version

    @property
    def meta(self) -> dict[str, Any] | None:
        active = self._active
        return None if active is None else dict(active.meta)

    # -- installing ----------------------------------------------------------------------------

    def install(self, msg: ModelUpdate) -> bool:
        """Check, store and switch to ``msg``; False if that exact model is already in use.

        Raises a :class:`ModelRejectedError` subclass (nothing changed) for a model that is not used."""
        with self._lock:
            current = self._active
            if msg.format != "onnx":
                raise ModelFormatError(f"model format {msg.format!r} is not onnx")
            if current is not None and msg.model_version <= current.version:
                if msg.model_version == current.version and msg.sha256.hex() == current.meta["sha256"]:
                    return False
                raise StaleModelError(f"model v{msg.model_version} is not newer than v{current.version} in use")
            digest = hashlib.sha256(msg.data).hexdigest()
            if digest != msg.sha256.hex():
                raise ModelHashError(f"model v{msg.model_version}: bytes hash to {digest[:16]}..., the message says "
                                     f"{msg.sha256.hex()[:16]}...")
            if self.profile is not None:
                why = msg.fit_error(self.profile)
                if why is not None:
                    raise ModelProfileError(why)
            meta = _meta_of(msg)
            loaded = LoadedModel(meta, self._session(msg.data))
            meta["file"] = f"model-{msg.model_version}-{digest[:16]}.onnx"
            meta["installed_at"] = time.time()
            try:
                write_atomic(self.dir / meta["file"], msg.data)
                previous = None if current is None else current.meta
                write_atomic(self.dir / META, json.dumps({"current": meta, "previous": previous}).encode())
            except OSError as exc:
                raise ModelStorageError(f"cannot store model v{msg.model_version}: {exc}") from None
            self._activate(loaded)
            self._prune({meta["file"], previous["file"] if previous else ""})
            self.counters.inc("model_installed")
            return True

    def offer(self, msg: ModelUpdate) -> bool:
        """:meth:`install`, counting and logging a refusal instead of raising (what the SDK calls)."""
        try:
            installed = self.install(msg)
        except ModelRejectedError as exc:
            self.counters.reject(exc)
            self.counters.inc(f"model_rejected.{exc.reason}")
            log.warning("model v%s refused: %s: %s", msg.model_version, type(exc).__name__, exc)  # pragma: no mutate
            return False
        if not installed:
            self.counters.inc("model_unchanged")
        return installed

    def set_profile(self, profile: CapabilityProfile) -> None:
        """The device (re)registered: a model in use that does not fit the new profile is no longer used."""
        with self._lock:
            self.profile = profile
            active = self._active
            if active is not None and _fit_error(active.meta, profile) is not None:
                self._active = None
                self.counters.inc("model_disk.profile")
                self.counters.set("model_version", -1)

    # -- predicting ----------------------------------------------------------------------------

    def predict(self, record: FeatureRecord | Mapping[str, Any]) -> tuple[int, np.ndarray]:
        """``(label, probabilities)`` for one record (a ``FeatureRecord`` or ``modality -> array``) on the device.

        ``LookupError`` without a model; :class:`ModelInputError` for a record the model cannot read."""
        active = self._active
        if active is None:
            raise LookupError("no local model installed")
        probs = active.run(record.modalities if isinstance(record, FeatureRecord) else record)
        return int(probs.argmax()), probs

    def prediction(self, record: FeatureRecord) -> Prediction | None:
        """A :class:`Prediction` as the edge would send it, or None when there is no model to run or it failed
        (counted ``predict.local_errors``): the caller asks the edge instead."""
        active = self._active
        if active is None:
            return None
        try:
            label, probs = self.predict(record)
        except ModelInputError:
            raise
        except Exception:
            self.counters.inc("predict.local_errors")
            log.exception("local model v%s failed", active.version)  # pragma: no mutate
            return None
        self.counters.inc("predict.local")
        return Prediction(record.device, record.sample, label, probs, active.version)

    # -- disk ----------------------------------------------------------------------------------

    def _session(self, data: bytes | str) -> Any:
        """An onnxruntime session for model bytes, or for a file's path (no copy of the model held meanwhile)."""
        ort = onnxruntime_module()
        # threads, arena and providers tune memory and speed only: no behaviour a test could tell apart
        opts = ort.SessionOptions()  # pragma: no mutate
        opts.intra_op_num_threads = self.threads  # pragma: no mutate
        opts.inter_op_num_threads = 1  # pragma: no mutate
        opts.enable_cpu_mem_arena = False  # pragma: no mutate
        opts.log_severity_level = 4  # pragma: no mutate
        try:
            cpu = ["CPUExecutionProvider"]  # pragma: no mutate
            return ort.InferenceSession(data, sess_options=opts, providers=cpu)  # pragma: no mutate
        except Exception as exc:  # onnxruntime raises its own types for every kind of bad file
            raise ModelCorruptError(f"onnxruntime cannot load the model: {type(exc).__name__}: {exc}"[:500]) from None

    def _activate(self, loaded: LoadedModel) -> None:
        self._active = loaded
        self.counters.set("model_version", loaded.version)
        _release_heap()

    def _load_from_disk(self) -> None:
        """The last good model: ``current`` if intact, else ``previous`` (a rollback); leftovers of torn writes
        (``*.tmp``) are removed, never read."""
        for leftover in self.dir.glob("*.tmp"):
            leftover.unlink(missing_ok=True)
            self.counters.inc("model_disk.leftover_tmp")
        try:
            state = json.loads((self.dir / META).read_text())
            candidates = [state.get("current"), state.get("previous")]
        except FileNotFoundError:
            return
        except (OSError, ValueError, AttributeError) as exc:
            self.counters.inc("model_disk.bad_meta")
            log.warning("model store %s: unreadable %s: %s", self.dir, META, exc)  # pragma: no mutate
            return
        for i, meta in enumerate(candidates):
            if not isinstance(meta, dict):
                continue
            try:
                path = self.dir / str(meta["file"])
                if sha256_file(path) != meta["sha256"]:
                    raise ModelHashError(f"{meta['file']} no longer hashes to its recorded sha256")
                if self.profile is not None and _fit_error(meta, self.profile) is not None:
                    raise ModelProfileError(str(_fit_error(meta, self.profile)))
                self._activate(LoadedModel(meta, self._session(str(path))))
            except (OSError, KeyError, TypeError, ValueError) as exc:  # ModelRejectedError is a ValueError
                reason = exc.reason if isinstance(exc, ModelRejectedError) else "unreadable"
                self.counters.inc(f"model_disk.{reason}")
                log.warning("model store %s: not loading %s: %s", self.dir, meta.get("file"), exc)  # pragma: no mutate
                continue
            if i:
                self.counters.inc("model_disk.rollback")
            return

    def _prune(self, keep: set[str]) -> None:
        for path in self.dir.glob("model-*.onnx"):
            if path.name not in keep:
                path.unlink(missing_ok=True)


def _release_heap() -> None:
    """Hand the model's parsing buffers back to the OS (glibc keeps freed heap otherwise: ~1 MB on a 1.8 MB
    model); a no-op where there is no glibc."""
    with contextlib.suppress(OSError, AttributeError):  # pragma: no mutate (memory only: no behaviour to test)
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # pragma: no mutate


def _fit_error(meta: Mapping[str, Any], profile: CapabilityProfile) -> str | None:
    inputs = {m: (int(s[0]), int(s[1])) for m, s in meta["inputs"].items()}
    return ModelUpdate(int(meta["model_version"]), b"", inputs, [], 1, b"").fit_error(profile)


__all__ = [  # the errors live in device_sdk.model_errors; firmware may import them from here
    "LocalModel",
    "ModelCorruptError",
    "ModelFormatError",
    "ModelHashError",
    "ModelInputError",
    "ModelProfileError",
    "ModelRejectedError",
    "ModelShapeError",
    "ModelStorageError",
    "StaleModelError",
]
