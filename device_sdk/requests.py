"""Inference requests until answered: re-send what the broker lost, give the application one answer per request.

Why: a broker's PUBACK only says the broker took the message. NATS lost PUBACKed requests in a JetStream
failover and Mosquitto drops them beyond an offline subscriber's queue, so a request could stay unanswered
for ever. And a re-sent request may be answered twice (the first answer was only late, or a re-send reached
another member of the inference workers' ``$share`` group, which signs with its own sender and seq).

So each request is remembered (its seq, sample id and the exact bytes sent) until an answer completes it:
a ``Prediction`` whose ``sample`` is the request's (the oldest outstanding request for that sample), or an
``ErrorReport`` whose ``ref`` is the request's seq. Unanswered ``retry_s`` after it was sent (and once the broker
acknowledged it: a request still in flight or in the on-disk queue is the SDK's ordinary delivery's business),
it is published again with the same seq and bytes (``infer_resent``), then after twice as long, ...; after
``max_tries`` publishes it is given up (``infer_given_up``; a late answer still reaches the application).
An answer to a request already completed is dropped before the application's callback
(``infer_duplicate_answers``); the first answer to a request given up completes it late. An answer this client
cannot place (a request sent before a restart; a prediction nobody asked for) is delivered, as before requests
were tracked. At most :data:`MAX_OUTSTANDING` requests are tracked: one more gives the oldest up (counted
``infer_given_up``; its answer, if any, is still delivered once).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from broker import topics
from broker.chunking import frames
from broker.metrics import Counters
from broker.wire import FeatureRecord, Kind, encode_envelope

if TYPE_CHECKING:
    from device_sdk.metrics import DeviceMetrics
    from device_sdk.store import DiskQueue

MAX_OUTSTANDING = 4096
"""Requests tracked for an answer at once; one more gives the oldest up."""
DONE_MAX = 4096
"""Completed (and given up) requests remembered, so that a second (or late) answer to one is recognised."""
CHECK_EVERY_S = 0.1

Handler = Callable[[Kind, Any], None]


class _Request:
    __slots__ = ("due", "payload", "sample", "tries")

    def __init__(self, sample: int, payload: bytes, due: float) -> None:
        self.sample = sample
        self.payload = payload
        self.tries = 1
        self.due = due


class RequestBook:
    """Outstanding inference requests of one device (thread-safe: answers arrive in paho's thread).

    Args:
        retry_s: ``infer_retry_s``: first re-send this long after the request; 0 disables re-sends (answers are
            still de-duplicated).
        max_tries: Publishes of one request, the first included, before it is given up.
        counters: The client's: ``infer_resent``, ``infer_given_up``, ``infer_duplicate_answers``.
    """

    def __init__(self, retry_s: float, max_tries: int, counters: Counters,
                 max_outstanding: int = MAX_OUTSTANDING) -> None:
        self.retry_s = retry_s
        self.max_tries = max(int(max_tries), 1)
        self.counters = counters
        self.max_outstanding = max(int(max_outstanding), 1)
        self.outstanding: OrderedDict[int, _Request] = OrderedDict()  # seq -> request, oldest first
        self._by_sample: dict[int, list[int]] = {}  # sample -> outstanding seqs, oldest first
        self._done_samples: OrderedDict[int, None] = OrderedDict()
        self._done_seqs: OrderedDict[int, None] = OrderedDict()
        self._late_samples: OrderedDict[int, None] = OrderedDict()  # given up: the first answer still completes
        self._late_seqs: OrderedDict[int, None] = OrderedDict()
        self._lock = threading.Lock()
        self.next_check = 0.0

    def sent(self, seq: int, sample: int, payload: bytes, now: float | None = None) -> None:
        """Track request ``seq`` (before it is published: its answer may come at once)."""
        now = time.monotonic() if now is None else now
        sample = int(sample)
        with self._lock:
            while len(self.outstanding) >= self.max_outstanding:
                self._give_up(next(iter(self.outstanding)))
            self.outstanding[seq] = _Request(sample, payload, now + self.retry_s)
            self._by_sample.setdefault(sample, []).append(seq)
            self._done_samples.pop(sample, None)  # a new request for it: its answer is no duplicate

    def answer(self, kind: Kind, message: Any) -> bool:
        """Whether this downlink goes on to the application: False for a second answer to a completed request."""
        with self._lock:
            if kind is Kind.PREDICTION:
                sample = int(message.sample)
                seqs = self._by_sample.get(sample)
                if seqs:
                    self._complete(seqs[0])
                    return True
                if sample in self._done_samples:
                    self.counters.inc("infer_duplicate_answers")
                    return False
                if self._late_samples.pop(sample, 0) is None:
                    _remember(self._done_samples, sample)
                return True
            ref = message.ref if kind is Kind.ERROR else None
            if ref is None:
                return True
            if ref in self.outstanding:
                self._complete(ref)
                return True
            if ref in self._done_seqs:
                self.counters.inc("infer_duplicate_answers")
                return False
            if self._late_seqs.pop(ref, 0) is None:
                _remember(self._done_seqs, ref)
            return True  # an error about a record or a registration: not a request's answer

    def due(self, now: float, blocked: Callable[[int], bool]) -> list[tuple[int, bytes]]:
        """``(seq, payload)`` of the requests to publish again now (counted ``infer_resent``); those out of tries
        are given up. ``blocked(seq)``: not acknowledged by the broker yet, so its timer starts over."""
        if self.retry_s <= 0 or now < self.next_check:
            return []
        self.next_check = now + CHECK_EVERY_S
        out = []
        with self._lock:
            for seq, req in list(self.outstanding.items()):
                if req.due > now:
                    continue
                if blocked(seq):
                    req.due = now + self.retry_s
                elif req.tries >= self.max_tries:
                    self._give_up(seq)
                else:
                    req.due = now + self.retry_s * 2 ** req.tries
                    req.tries += 1
                    out.append((seq, req.payload))
        if out:
            self.counters.inc("infer_resent", len(out))
        return out

    def _complete(self, seq: int) -> None:
        sample = self._drop(seq)
        _remember(self._done_seqs, seq)
        _remember(self._done_samples, sample)

    def _give_up(self, seq: int) -> None:
        _remember(self._late_seqs, seq)
        _remember(self._late_samples, self._drop(seq))
        self.counters.inc("infer_given_up")

    def _drop(self, seq: int) -> int:
        sample = self.outstanding.pop(seq).sample
        seqs = self._by_sample[sample]
        seqs.remove(seq)
        if not seqs:
            del self._by_sample[sample]
        return sample

    def wrap(self, handler: Handler) -> Handler:
        """The downlink handler, with second answers to a request taken out."""

        def once(kind: Kind, message: Any) -> None:
            if (kind is Kind.PREDICTION or kind is Kind.ERROR) and not self.answer(kind, message):
                return
            handler(kind, message)

        return once


def _remember(done: OrderedDict[int, None], key: int) -> None:
    done[key] = None
    done.move_to_end(key)
    if len(done) > DONE_MAX:
        done.popitem(last=False)


class InferenceRequests:
    """The :class:`~device_sdk.client.DeviceClient` side: send a request, re-send it while unanswered.

    A mixin like :class:`~device_sdk.receipts.DeliveryReceipts` (state is the client's, declared here for reading);
    it comes first in the client's bases, so its :meth:`_process_events` runs the re-send check after the events."""

    _requests: RequestBook
    _lock: threading.Condition
    _inflight: dict[int, tuple[int, str, bytes, Any]]
    _online: bool
    store: DiskQueue
    metrics: DeviceMetrics
    site: str
    device: str
    max_packet: int

    if TYPE_CHECKING:  # the client's
        def _next_seq(self) -> int: ...
        def _send(self, kind: Kind, topic: str, body: dict[str, Any], *, seq: int | None = None,
                  payload: bytes | None = None) -> int: ...
        def _publish_now(self, topic: str, payload: bytes, *, seq: int, row_id: int | None = None) -> None: ...

    def request_inference(self, record: FeatureRecord) -> int:
        """Ask the edge for a prediction; returns the request's seq. Its answer arrives on the downlink once: a
        ``Prediction`` for ``record.sample`` (keep sample ids of outstanding requests distinct: answers are matched
        by it) or an ``ErrorReport`` whose ``ref`` is the seq. Unanswered, it is re-sent (``infer_retry_s``)."""
        self.metrics.infer_sent(record.sample)
        body = record.to_body()
        topic = topics.device_up(self.site, self.device, topics.Uplink.INFER)
        with self._lock:
            seq = self._next_seq()
            payload = encode_envelope(Kind.INFER, self.device, seq, body)
            self._requests.sent(seq, record.sample, payload)
            return self._send(Kind.INFER, topic, body, seq=seq, payload=payload)

    def _process_events(self) -> None:
        super()._process_events()  # type: ignore[misc]  # device_sdk.events.LinkEvents
        if self._requests.outstanding and self._online:
            self._resend_requests()

    def _resend_requests(self) -> None:
        """Publish the requests due again, same seq and bytes (caller holds the lock)."""
        unacked = {p[0] for p in self._inflight.values()}
        queued = len(self.store) > 0  # the request may wait there: the drain sends it
        due = self._requests.due(time.monotonic(), lambda seq: queued or seq in unacked)
        if not due:
            return
        topic = topics.device_up(self.site, self.device, topics.Uplink.INFER)
        for seq, payload in due:
            parts = [(topic, payload)] if len(payload) <= self.max_packet else frames(
                topic, payload, sender=self.device, seq=seq, max_packet=self.max_packet)
            for t, p in parts:
                self._publish_now(t, p, seq=seq)
