"""A device's ``features_batch``: many records checked and buffered as stacked arrays in one step.

Kept beside :mod:`edge_agent.core` (which routes it here) so the single-record hot path stays readable. The
rules match single records (docs/wire/SPEC.md §3, "Batches"): a batch is one message, de-duplicated by its
envelope ``n`` on the device's ``features`` stream (the one guard single ``features`` use too), accepted or
refused whole (a refused batch changes nothing and does not advance the guard), and counted by records:
``records`` per device, ``samples_total``/``unlabeled`` per record, ``batches`` per message.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker.wire import Envelope, FeatureBatch
from edge_agent.errors import UnregisteredDeviceError

if TYPE_CHECKING:
    from edge_agent.core import EdgeCore, Effects


def on_features_batch(core: EdgeCore, fx: Effects, device: str, env: Envelope) -> None:
    """Validate ``env`` (a ``features_batch`` of ``device``) and buffer its labelled records in one call."""
    registry = core.registry
    entry = registry.devices.get(device)
    if entry is None:
        raise UnregisteredDeviceError(f"device {device!r} is not registered; publish a registration first")
    fx.receipt = device
    if registry.is_duplicate("features", device, env.seq):
        core.counters.inc("duplicates")
        return
    batch = FeatureBatch.from_body(env.body, max_record_bytes=core.config.limits.max_array_bytes)
    checked = registry.check_batch(device, batch)
    registry.is_new("features", device, env.seq)  # only now: a refused batch must not advance the guard
    fx.durable = True  # unlabeled too: a replay rebuilds the guard (and so the receipts) from the log
    count = batch.count
    entry.count("records", count)
    core.counters.inc("batches")
    labels = checked["labels"]
    if labels is None:
        core.counters.inc("unlabeled", count)
        return
    assert core.trainer is not None
    modalities = checked["modalities"]
    core.trainer.buffer.add_many(device, modalities, labels)
    core.counters.inc("samples_total", count)
    seen = core.modalities_seen
    for name in modalities:
        seen[name] = seen.get(name, 0) + count
    core.new_samples += count
    fx.durable = True
    if core.new_samples >= core.config.training.min_new_samples:
        fx.train_due = True
