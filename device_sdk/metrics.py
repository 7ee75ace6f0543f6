"""A device's own metrics, published retained as JSON so a dashboard sees every gateway's health.

What an operator asks of a gateway: how much waits on disk (``queued``), what the overflow policy threw
away (``dropped``), what went out and what the broker acknowledged (``sent``, ``acked``), how long the edge
takes to answer an inference request (``rtt_ms``, measured here from request to prediction), the last
error the edge sent back, and which local model runs. The document layout is ``docs/METRICS.md``'s
``device`` metrics, validated by ``megace/dashboard/schemas/metrics.device.json``.

A daemon thread publishes every ``interval_s`` (and once more on close), holding the client's lock
like every other publish, so it never races paho from a second thread. Nothing here imports more than
the standard library and the bus contract: ``import device_sdk`` stays light.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from broker import topics
from broker.wire import Kind
from broker.wire.status import metrics_payload

if TYPE_CHECKING:  # pragma: no cover - typing only; a real import would be circular
    from device_sdk.client import DeviceClient

PENDING_MAX = 4096
"""Inference requests remembered for their round trip; older ones are forgotten (counted as ``rtt_lost``)."""

RTT_WINDOW = 512
"""Round trips kept for the percentiles: a recent window, not the whole life of the device."""


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of ``values``; None for none (JSON null, not 0: 'no data')."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


class DeviceMetrics:
    """Collects a :class:`DeviceClient`'s figures and publishes them retained on its site's metrics topic."""

    def __init__(self, client: DeviceClient, interval_s: float = 5.0) -> None:
        self.client = client
        self.interval_s = interval_s
        self.topic = topics.metrics(topics.Role.DEVICE, client.device, client.site)
        self._lock = threading.Lock()
        self._pending: OrderedDict[int, float] = OrderedDict()  # sample -> monotonic send time
        self._rtts: deque[float] = deque(maxlen=RTT_WINDOW)
        self._rtt_count = 0
        self._rtt_lost = 0
        self._last_error: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- hooks (called by the client) ------------------------------------------------------------

    def infer_sent(self, sample: int) -> None:
        """An inference request for ``sample`` is about to go out: its answer's arrival closes the round trip."""
        with self._lock:
            self._pending[int(sample)] = time.monotonic()
            self._pending.move_to_end(int(sample))
            while len(self._pending) > PENDING_MAX:
                self._pending.popitem(last=False)
                self._rtt_lost += 1

    def wrap(self, handler: Callable[[Kind, Any], None] | None) -> Callable[[Kind, Any], None]:
        """The downlink handler, observed: predictions close round trips, errors become ``last_error``."""

        def observed(kind: Kind, message: Any) -> None:
            self.observe(kind, message)
            if handler is not None:
                handler(kind, message)

        return observed

    def observe(self, kind: Kind, message: Any) -> None:
        now = time.monotonic()
        if kind is Kind.PREDICTION:
            with self._lock:
                sent = self._pending.pop(int(message.sample), None)
                if sent is not None:
                    self._rtts.append((now - sent) * 1000.0)
                    self._rtt_count += 1
        elif kind is Kind.ERROR:
            with self._lock:
                self._last_error = {"code": str(message.code), "message": str(message.message)[:200],
                                    "ref": message.ref, "ts": time.time()}

    # -- the document ----------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The ``metrics`` map of the device's document (JSON-safe)."""
        c = self.client
        with c._lock:  # the store and the in-flight map belong to whoever holds the client's lock
            c._process_events()  # reap the acknowledgements paho queued since (as ``pending`` does)
            queued, inflight, unreceipted = len(c.store), len(c._inflight), len(c._book.held)
            dropped, overflow = int(c.store.dropped), c.store.overflow.value
        counts = _counters(c)
        with self._lock:
            rtts = list(self._rtts)
            rtt = {"count": self._rtt_count, "window": len(rtts), "lost": self._rtt_lost,
                   "last": rtts[-1] if rtts else None, "p50": percentile(rtts, 50), "p99": percentile(rtts, 99),
                   "mean": sum(rtts) / len(rtts) if rtts else None}
            last_error = dict(self._last_error) if self._last_error is not None else None
        sent_by_kind = {k.split(".", 1)[1]: int(v) for k, v in counts.items()
                        if k.startswith("sent.") and k != "sent.batched_records"}
        rejected = {k.split(".", 1)[1]: int(v) for k, v in counts.items() if k.startswith("rejected.")}
        model = c.model
        return {
            "site": c.site,
            "online": bool(c.online),
            "queued": queued,
            "inflight": inflight,
            "dropped": dropped,
            "overflow": overflow,
            "sent": sum(sent_by_kind.values()),
            "sent_by_kind": sent_by_kind,
            "acked": int(counts.get("acked", 0)),
            "requeued": int(counts.get("requeued", 0)),
            "receipted": int(counts.get("receipted", 0)),
            "resent": int(counts.get("resent", 0)),
            "unreceipted": unreceipted,
            "infer_resent": int(counts.get("infer_resent", 0)),
            "infer_given_up": int(counts.get("infer_given_up", 0)),
            "infer_duplicate_answers": int(counts.get("infer_duplicate_answers", 0)),
            "connects": int(counts.get("connects", 0)),
            "disconnects": int(counts.get("disconnects", 0)),
            "predictions": int(counts.get("received.prediction", 0)),
            "errors_received": int(counts.get("received.error", 0)),
            "rejected": rejected,
            "rtt_ms": rtt,
            "last_error": last_error,
            "model_version": None if model is None else model.version,
        }

    def payload(self) -> bytes:
        c = self.client
        return metrics_payload(topics.Role.DEVICE.value, c.device, self.snapshot(), site=c.site)

    # -- publishing ------------------------------------------------------------------------------

    def publish(self, wait: float = 0.0) -> bool:
        """Publish the document now (retained, QoS 1) if online; True if it was handed to the connection."""
        payload = self.payload()
        c = self.client
        with c._lock:
            paho = c._client
            if paho is None or not c.online:
                return False
            info = paho.publish(self.topic, payload, qos=1, retain=True)
        if wait > 0:
            info.wait_for_publish(wait)
        return True

    def start(self) -> None:
        if self._thread is None and self.interval_s > 0:
            self._thread = threading.Thread(target=self._run, name=f"megace-sdk-metrics:{self.client.device}",
                                            daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the publisher and send the final figures (the retained document outlives the connection)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
        with contextlib.suppress(RuntimeError, ValueError, OSError):  # a connection closing under us: keep the last
            self.publish(wait=2.0)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.publish()
            except (RuntimeError, ValueError, OSError):  # never let a metrics tick kill the device
                continue


def _counters(client: DeviceClient) -> dict[str, Any]:
    """A copy of the client's counters; paho's thread may add a key meanwhile, so retry a torn copy."""
    for _ in range(5):
        try:
            return client.counters.snapshot()
        except RuntimeError:  # "dictionary changed size during iteration"
            continue
    return {}
