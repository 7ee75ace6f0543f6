"""Durable agent state under ``state_dir``: checkpoint generations, the upload outbox, confirmations.

Layout::

    state_dir/
      CURRENT                      name of the committed generation (tmp + fsync + rename)
      checkpoints/gen-00000042/
        trainer/                   Trainer.save_checkpoint (LoRA, personal part, AdamW state)
        samples.msgpack            the replay buffer (incl. samples not trained on yet)
        outbox/<seq>.msgpack       uploads not yet confirmed by the broker, byte-exact
        agent.json                 counters, registry, upload seq, sha256 of the files above
      confirmed.json               highest upload seq the broker acknowledged
      downlink_seq.json            highest device-downlink seq reserved (seqs survive restarts)
      ingest/seg-<n>.log           device messages logged since the committed generation (ingestlog)
      adapter/                     the shared adapter in peft format (export, after each round)

A generation is written completely, then committed by flipping ``CURRENT``; a crash at
any point leaves the previous generation committed. An upload is in the outbox of the
generation that first records its seq, so after a crash it is re-published with the same
seq and the same bytes (the cloud de-duplicates by edge + seq) and never re-numbered.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from broker.errors import WireError
from broker.wire import decode_array, encode_array
from edge_agent.training.replay import BufferedSample
from megace_common.durable import atomic_write, fsync_dir, write_synced

log = logging.getLogger(__name__)

STATE_FORMAT = 1
CURRENT = "CURRENT"
CONFIRMED = "confirmed.json"
DOWNLINK_SEQ = "downlink_seq.json"
GEN_PREFIX = "gen-"
KEEP_GENERATIONS = 2


class StateError(Exception):
    """A generation on disk is missing, truncated, corrupt or from an unknown format."""


@dataclass
class AgentState:
    """What the agent must remember across restarts besides the model."""

    round: int = 0
    upload_seq: int = 0
    """Last upload sequence number assigned (never reused, even for uploads never published)."""
    global_version: int = -1
    global_source: str = ""
    """``global`` or ``view`` (the site's rank-truncated view), whichever was applied last."""
    totals: dict[str, int] = field(default_factory=dict)
    last_round: dict[str, Any] = field(default_factory=dict)
    ingest_segment: int = 0
    """The ingest log's first segment after this generation: replay starts there (see ``ingestlog``)."""
    ingest_offset: int = 0
    """Byte of ``ingest_segment`` replay starts at (a receiver process's log is read mid-segment; see ``logtail``)."""


@dataclass
class Generation:
    """One committed checkpoint, read back and verified."""

    path: Path
    state: AgentState
    registry: dict[str, Any]
    samples: list[BufferedSample]
    outbox: list[tuple[int, bytes]]

    @property
    def trainer_dir(self) -> Path:
        return self.path / "trainer"




def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode_samples(samples: list[BufferedSample]) -> bytes:
    items = [[s.seq, s.device_id, s.label, {k: encode_array(v) for k, v in s.modalities.items()}] for s in samples]
    return msgpack.packb({"v": STATE_FORMAT, "items": items}, use_bin_type=True)


def decode_samples(data: bytes) -> list[BufferedSample]:
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
        if obj.get("v") != STATE_FORMAT:
            raise StateError(f"samples format {obj.get('v')!r} unknown")
        return [
            BufferedSample(seq=int(seq), device_id=str(dev), label=int(label),
                           modalities={k: decode_array(v).copy() for k, v in mods.items()})
            for seq, dev, label, mods in obj["items"]
        ]
    except (ValueError, TypeError, KeyError, AttributeError, WireError, msgpack.UnpackException) as exc:
        raise StateError(f"samples file unreadable: {exc}") from exc


class StateStore:
    """Reads and writes generations under ``root``; all methods are synchronous (call off the loop)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.checkpoints = self.root / "checkpoints"

    # ------------------------------------------------------------------ writing
    def _generations(self) -> list[Path]:
        if not self.checkpoints.is_dir():
            return []
        gens = [p for p in self.checkpoints.iterdir() if p.is_dir() and p.name.startswith(GEN_PREFIX)]
        return sorted(gens, key=lambda p: p.name)

    def current_name(self) -> str | None:
        try:
            return (self.root / CURRENT).read_text().strip() or None
        except OSError:
            return None

    def save(
        self,
        *,
        trainer: Any,
        state: AgentState,
        registry: dict[str, Any],
        samples: list[BufferedSample],
        outbox: list[tuple[int, bytes]],
    ) -> Path:
        """Write a full generation and commit it; returns its directory."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        existing = self._generations()
        number = int(existing[-1].name[len(GEN_PREFIX) :]) + 1 if existing else 1
        gen = self.checkpoints / f"{GEN_PREFIX}{number:08d}"
        if gen.exists():  # debris of a crashed write; never committed
            shutil.rmtree(gen)
        gen.mkdir()
        trainer.save_checkpoint(gen / "trainer")
        samples_bytes = encode_samples(samples)
        write_synced(gen / "samples.msgpack", samples_bytes)
        (gen / "outbox").mkdir()
        hashes = {}
        for seq, payload in outbox:
            write_synced(gen / "outbox" / f"{seq}.msgpack", payload)
            hashes[str(seq)] = _sha(payload)
        fsync_dir(gen / "outbox")
        meta = {
            "format": STATE_FORMAT,
            "state": asdict(state),
            "registry": registry,
            "samples_sha256": _sha(samples_bytes),
            "outbox": hashes,
        }
        write_synced(gen / "agent.json", json.dumps(meta, sort_keys=True).encode())
        fsync_dir(gen)
        fsync_dir(self.checkpoints)
        atomic_write(self.root / CURRENT, gen.name.encode())
        self._prune(keep=gen.name)
        return gen

    def _prune(self, keep: str) -> None:
        gens = [g for g in self._generations() if g.name <= keep]
        for old in gens[:-KEEP_GENERATIONS]:
            shutil.rmtree(old, ignore_errors=True)
        for debris in (g for g in self._generations() if g.name > keep):
            shutil.rmtree(debris, ignore_errors=True)

    # ------------------------------------------------------------------ reading
    def candidates(self) -> list[Path]:
        """Generations to try, the committed one first, then older ones newest first."""
        gens = self._generations()
        current = self.current_name()
        ordered = [g for g in gens if g.name == current]
        ordered += [g for g in reversed(gens) if g.name != current and (current is None or g.name < current)]
        return ordered

    def has_state(self) -> bool:
        """True if anything was ever committed here (so failing to load it means corruption)."""
        return (self.root / CURRENT).exists() or bool(self._generations())

    def read(self, gen: Path) -> Generation:
        """Read and verify a generation (the trainer checkpoint is verified by the trainer)."""
        try:
            meta = json.loads((gen / "agent.json").read_text())
            if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
                raise StateError(f"{gen}: unknown state format")
            samples_bytes = (gen / "samples.msgpack").read_bytes()
            if _sha(samples_bytes) != meta["samples_sha256"]:
                raise StateError(f"{gen}: samples checksum mismatch")
            outbox = []
            for seq, digest in sorted(meta["outbox"].items(), key=lambda kv: int(kv[0])):
                payload = (gen / "outbox" / f"{seq}.msgpack").read_bytes()
                if _sha(payload) != digest:
                    raise StateError(f"{gen}: outbox {seq} checksum mismatch")
                outbox.append((int(seq), payload))
            state = AgentState(**meta["state"])
            return Generation(gen, state, dict(meta["registry"]), decode_samples(samples_bytes), outbox)
        except StateError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StateError(f"{gen}: {type(exc).__name__}: {exc}") from exc

    # ------------------------------------------------------------ confirmations
    def confirmed(self) -> int:
        """Highest upload seq acknowledged by the broker (0 if none or unreadable)."""
        try:
            return int(json.loads((self.root / CONFIRMED).read_text())["seq"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def downlinks_reserved(self) -> int:
        """The highest downlink seq this edge may have used (0 if none recorded or unreadable)."""
        try:
            return int(json.loads((self.root / DOWNLINK_SEQ).read_text())["reserved"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def reserve_downlinks(self, upto: int) -> None:
        """Record (fsync'd) that downlink seqs up to ``upto`` may be used; called before any is."""
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write(self.root / DOWNLINK_SEQ, json.dumps({"reserved": int(upto)}).encode())

    def confirm(self, seq: int) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write(self.root / CONFIRMED, json.dumps({"seq": int(seq)}).encode())

