"""Offline speech synthesis with Debian's ``espeak-ng`` (a subprocess; no Python dependency).

Used to make a spoken-digit modality where no recorded-speech corpus installs offline.
"""

from __future__ import annotations

import shutil
import subprocess
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

INSTALL_HINT = "espeak-ng is needed to synthesize speech offline; install it with: apt-get install -y espeak-ng"


class EspeakMissingError(RuntimeError):
    """Raised when the ``espeak-ng`` executable is not on PATH."""


@dataclass(frozen=True)
class Voice:
    """One espeak-ng speaker setting: accent (``-v`` language), variant (``+m3``), speed (wpm), pitch (0-99)."""

    language: str
    variant: str
    speed: int
    pitch: int

    @property
    def key(self) -> str:
        return f"{self.language}+{self.variant}_s{self.speed}_p{self.pitch}"


def espeak_path() -> str:
    """The ``espeak-ng`` executable, or a clear error telling how to install it."""
    path = shutil.which("espeak-ng")
    if path is None:
        raise EspeakMissingError(INSTALL_HINT)
    return path


def synthesize(text: str, voice: Voice, out: Path) -> Path:
    """Write ``text`` spoken by ``voice`` to the WAV file ``out`` (22.05 kHz mono 16-bit)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.wav")
    cmd = [
        espeak_path(), "-v", f"{voice.language}+{voice.variant}",
        "-s", str(voice.speed), "-p", str(voice.pitch), "-w", str(tmp), text,
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)
    tmp.replace(out)  # atomic: a half-written WAV is never mistaken for a cached one
    return out


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """A 16-bit mono WAV as float32 in [-1, 1] and its sample rate (stdlib ``wave``, no scipy)."""
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise ValueError(f"{path}: expected 16-bit mono, got {w.getsampwidth() * 8}-bit x{w.getnchannels()}")
        rate = w.getframerate()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    return pcm.astype(np.float32) / 32768.0, rate
