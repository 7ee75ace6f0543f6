"""Raw IMU samples -> the ``accel``/``gyro`` token features the edge expects, on onnxruntime (no torch).

The front end is an ONNX graph built by ``megace extractors build``: ``[steps, channels]`` raw samples
(accelerometer x/y/z then gyroscope x/y/z, one row per sample, as a sensor buffer fills) are standardized
with constants fixed at build time and cut into windows of ``window`` steps. The ``imu`` extractor gives
``basicmotions``' features exactly (``[steps / window, window * 3]`` per modality, what the closed loop's
devices publish); ``imu-stats`` gives per-window mean, std and mean |delta| per channel (``[tokens, 9]``).
Keeping the constants and the windowing in one shipped file means a device cannot drift from the
preprocessing the edge's model was trained on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from broker.wire import ModalityProfile
from device_sdk.extractors.bundle import ExtractorFileError, ExtractorInputError, load_entry, open_session


class ImuFrontEnd:
    """One IMU front end of a bundle: ``front_end(samples)`` -> ``{modality: float32 [tokens, token_dim]}``."""

    def __init__(self, model: Path, *, channels: int, window: int, max_tokens: int, token_dims: dict[str, int],
                 threads: int = 1) -> None:
        self.channels, self.window, self.max_tokens = int(channels), int(window), int(max_tokens)
        self.token_dims = dict(sorted(token_dims.items()))
        self._session = open_session(Path(model), threads)
        outputs = sorted(o.name for o in self._session.get_outputs())
        if outputs != sorted(self.token_dims):
            raise ExtractorFileError(f"{model}: outputs {outputs} are not the modalities {sorted(self.token_dims)}")
        given = self._session.get_inputs()
        if len(given) != 1 or given[0].shape[-1] != self.channels:
            raise ExtractorFileError(f"{model}: inputs {[(i.name, i.shape) for i in given]}, expected one "
                                     f"[steps, {self.channels}]")
        self._input = given[0].name

    @classmethod
    def open(cls, root: Path, name: str = "imu", *, threads: int = 1) -> ImuFrontEnd:
        """The IMU front end ``name`` of a bundle, its file checked against the manifest."""
        entry = load_entry(Path(root), name, "imu")
        s = entry.spec
        try:
            tokens = {m: int(v["token_dim"]) for m, v in dict(s["modalities"]).items()}
            return cls(entry.files["model"], channels=len(s["channels"]), window=int(s["window"]),
                       max_tokens=int(s["max_tokens"]), token_dims=tokens, threads=threads)
        except (KeyError, TypeError, ValueError) as exc:
            raise ExtractorFileError(f"{root}: extractor {name!r} has an invalid manifest entry ({exc!r})") from None

    @property
    def modalities(self) -> dict[str, tuple[int, int]]:
        """Modality -> registered shape ``(max_tokens, token_dim)``."""
        return {m: (self.max_tokens, d) for m, d in self.token_dims.items()}

    def profiles(self, rate_hz: float = 1.0) -> dict[str, ModalityProfile]:
        """What to register (``CapabilityProfile.modalities``), ``rate_hz`` being the records sent per second."""
        return {m: ModalityProfile(shape=s, dtype="<f4", rate_hz=float(rate_hz)) for m, s in self.modalities.items()}

    def __call__(self, samples: Any) -> dict[str, np.ndarray]:
        """``[steps, channels]`` raw samples, ``steps`` a multiple of ``window`` up to ``window * max_tokens``."""
        x = np.asarray(samples)
        if x.dtype.kind not in "fiu" or x.ndim != 2 or x.shape[1] != self.channels:
            raise ExtractorInputError(f"expected numeric samples [steps, {self.channels}], got {x.dtype} {x.shape}")
        steps = x.shape[0]
        if steps == 0 or steps % self.window or steps > self.window * self.max_tokens:
            raise ExtractorInputError(f"{steps} steps: need a multiple of {self.window}, at most "
                                      f"{self.window * self.max_tokens} (max_tokens {self.max_tokens})")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not np.isfinite(x).all():
            raise ExtractorInputError("samples hold NaN or infinite values")
        names = [o.name for o in self._session.get_outputs()]
        arrays = self._session.run(names, {self._input: x})
        return {n: np.ascontiguousarray(arrays[i], dtype=np.float32) for i, n in enumerate(names)}
