"""Sending the edge's ONNX inference model to the devices that asked to predict on themselves.

Why here and not in the service: what to send to whom is a pure decision over the registry (which devices
asked with ``local_model``, whose registered profile the model fits, which already hold this version), and
the bytes are ordinary device downlinks: numbered from the edge's counter, signed when the edge signs, and
chunked to the packet budget (SPEC §3 "model", §4). The service only publishes what these functions return.

Wiring: the service awaits :func:`publish_model` after each export and once at start (the export on disk);
registrations need nothing more, since :meth:`EdgeCore._on_register` calls :func:`push_to_device` once a model
is set.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from broker.wire import Kind
from broker.wire.model import ModelUpdate

if TYPE_CHECKING:
    from edge_agent.core import EdgeCore, Outgoing
    from edge_agent.downlinks import DownlinkQueue
    from edge_agent.registry import DeviceEntry

log = logging.getLogger(__name__)


class Artifact(Protocol):
    """What an export gives (``megace_model.onnx.OnnxArtifact``): read by attribute, so no import of it here."""

    version: int
    data: bytes
    sha256: str
    inputs: Mapping[str, Sequence[int]]
    input_names: Sequence[str]
    classes: int


class ArtifactError(ValueError):
    """The artifact contradicts itself (its sha256 is not that of its bytes): nothing is sent."""


def model_update(artifact: Artifact) -> ModelUpdate:
    """The ``model`` body for ``artifact``; its sha256 is recomputed and must match the one it states."""
    digest = hashlib.sha256(artifact.data).digest()
    stated = getattr(artifact, "sha256", "") or ""
    if isinstance(stated, bytes):
        stated = stated.hex()
    if stated and stated.lower() != digest.hex():
        raise ArtifactError(f"artifact v{artifact.version} states sha256 {stated[:16]}..., its bytes hash to "
                            f"{digest.hex()[:16]}...")
    inputs = {m: (int(shape[0]), int(shape[1])) for m, shape in artifact.inputs.items()}
    msg = ModelUpdate(model_version=int(artifact.version), sha256=digest, inputs=inputs,
                      input_names=list(artifact.input_names), classes=int(artifact.classes), data=bytes(artifact.data))
    ModelUpdate.from_body(msg.to_body())  # what devices will refuse as malformed is refused here, before sending
    return msg


def skip_reason(entry: DeviceEntry, msg: ModelUpdate) -> str | None:
    """Why ``entry``'s device gets no copy of ``msg`` (None: send it)."""
    if not entry.local_model:
        return "not_asked"
    if entry.profile.model_version == msg.model_version:
        return "current"
    if msg.fit_error(entry.profile) is not None:
        return "unfit"
    return None


async def publish_model(core: EdgeCore, artifact: Artifact | None, downlinks: DownlinkQueue, *,
                        max_bytes: int) -> int:
    """The service's one call after an export (and at start): make ``artifact`` current and queue each device's
    copy, one device at a time, waiting for room in the downlink queue rather than dropping chunks.

    Built on the loop (device downlink seqs are the loop's), yielding between devices so ingest goes on. A model
    over ``max_bytes`` is not sent at all (``model_push.skipped.too_large``; devices keep the model they hold).
    Returns the number of devices sent a copy."""
    if artifact is not None and len(artifact.data) > max_bytes:
        log.warning("edge %s: model v%d is %d bytes, over limits.model_push_max_bytes (%d): not sent to devices",
                    core.edge_id, artifact.version, len(artifact.data), max_bytes)
        core.counters.inc("model_push.skipped.too_large")
        core.model_update = None
        return 0
    sent = 0
    for out in push_model_per_device(core, artifact):
        while downlinks.room() < len(out):
            await asyncio.sleep(0.05)
        downlinks.emit(out)
        sent += 1
        await asyncio.sleep(0)
    return sent


def push_model(core: EdgeCore, artifact: Artifact | ModelUpdate | None, *,
               max_packet: int | None = None) -> list[Outgoing]:
    """Make ``artifact`` the model devices get, and return its downlinks for every registered device that asked.

    Call it after each export, or after every refresh: the model already current sends nothing (``None``
    stops sending a model to new registrations). Counts ``model_push.sent``
    and ``model_push.bytes`` (wire bytes, chunks included), and skipped devices by reason
    (``model_push.skipped.current``/``unfit``).
    """
    return [o for part in push_model_per_device(core, artifact, max_packet=max_packet) for o in part]


def push_model_per_device(core: EdgeCore, artifact: Artifact | ModelUpdate | None, *,
                          max_packet: int | None = None) -> Iterator[list[Outgoing]]:
    """:func:`push_model`, one device's downlinks at a time, built as the iterator is advanced: for a big model
    and many devices, so the service holds one copy at a time and emits the next when its queue has room
    (a MiniLM model is about 90 MB, 360 chunks of 256 KiB). The model is made current at once."""
    if artifact is None:
        core.model_update = None
        return iter(())
    if _is_current(core.model_update, artifact):
        return iter(())
    msg = artifact if isinstance(artifact, ModelUpdate) else model_update(artifact)
    core.model_update = msg
    return (out for device in sorted(core.registry.devices) if (out := _one(core, device, msg, max_packet)))


def _is_current(current: ModelUpdate | None, artifact: Artifact | ModelUpdate) -> bool:
    """Whether ``artifact`` is the model already sent (same version and stated sha256; not re-hashed: a
    MiniLM model is 90 MB and this runs on the service's loop after every round)."""
    if current is None:
        return False
    if isinstance(artifact, ModelUpdate):
        return (artifact.model_version, artifact.sha256) == (current.model_version, current.sha256)
    stated = artifact.sha256.hex() if isinstance(artifact.sha256, bytes) else str(artifact.sha256 or "")
    return int(artifact.version) == current.model_version and stated.lower() == current.sha256.hex()


def push_to_device(core: EdgeCore, device: str, *, max_packet: int | None = None) -> list[Outgoing]:
    """The current model's downlinks for ``device`` (just registered), or [] when it did not ask, already holds
    this version, or the model does not fit its registered profile."""
    msg = core.model_update
    return [] if msg is None else _one(core, device, msg, max_packet)


def _one(core: EdgeCore, device: str, msg: ModelUpdate, max_packet: int | None) -> list[Outgoing]:
    entry = core.registry.devices.get(device)
    if entry is None:  # evicted since the push began
        return []
    reason = skip_reason(entry, msg)
    if reason is not None:
        if reason != "not_asked":
            core.counters.inc(f"model_push.skipped.{reason}")
        if reason == "unfit":
            log.info("edge %s: model v%d not sent to %s: %s", core.edge_id, msg.model_version,  # pragma: no mutate
                     device, msg.fit_error(entry.profile))  # pragma: no mutate
        return []
    out = core.down_frames(device, Kind.MODEL, msg, max_packet)
    core.counters.inc("model_push.sent")
    core.counters.inc("model_push.bytes", sum(len(o.payload) for o in out))
    return out


def wire_bytes(messages: Sequence[Outgoing | tuple[str, bytes]]) -> int:
    """Bytes on the wire for ``messages`` (payloads, chunk envelopes included): a model's download size."""
    return sum(len(m[1] if isinstance(m, tuple) else m.payload) for m in messages)
