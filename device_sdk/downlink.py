"""What reaches a device from its edge: decode, check, count, and hand to the user's callback.

Kept apart from the connection code because this is where trust in downlinks is decided (the
inbox's channel and dedup checks today; the edge's signature when the device is given its key),
and because it runs in paho's network thread: it must never block and never raise into paho.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from broker import topics
from broker.dedup import RecentEnvelopes
from broker.errors import WireError
from broker.inbox import Inbox
from broker.metrics import Counters
from broker.signing import Verifier
from broker.wire import ErrorCode, Kind
from broker.wire.bodies import decode_body
from broker.wire.receipt import ReceiptMismatchError

log = logging.getLogger(__name__)

UNREGISTERED = ErrorCode.UNREGISTERED.value
DownlinkHandler = Callable[[Kind, Any], None]
"""Called with the envelope kind and the decoded message (DeviceConfig, Prediction, ...)."""


class DownlinkReceiver:
    """Turns this device's downlink MQTT messages into decoded messages for ``handler``.

    Args:
        device: The device id (for log lines).
        counters: Where ``received.<kind>``, rejections by reason (``rejected.BadSignatureError``, ...)
            and ``callback_errors`` are counted.
        handler: The user's callback, or None to only count.
        verifier: The edge's public key(s): every downlink must carry a valid signature by one, so a
            forged prediction or config never reaches ``handler``. None accepts unsigned downlinks.
        on_reregister: Called with ``"request"`` for the edge's site-wide ``register_request`` and with
            ``"unregistered"`` for an ``unregistered`` error: the edge lacks this device's registration (the
            retained one may never reach an edge's wildcard filter, e.g. on RabbitMQ), so publish it again.
        on_delivery: Called with each ``Receipt`` (which the application never sees) and each ``DeviceConfig``
            (whether the edge sends receipts): see :mod:`device_sdk.receipts`.
    """

    def __init__(self, device: str, counters: Counters, handler: DownlinkHandler | None,
                 verifier: Verifier | None = None, on_reregister: Callable[[str], None] | None = None,
                 on_delivery: Callable[[Any], None] | None = None) -> None:
        self.device = device
        self.on_delivery = on_delivery
        self.counters = counters
        self.handler = handler
        self.on_reregister = on_reregister
        opener = None if verifier is None else (lambda _parsed, payload: verifier.open(payload))
        self._inbox = Inbox(channels=frozenset({topics.Channel.DEVICE_DOWN, topics.Channel.SITE_REQUEST}),
                            opener=opener)
        self._recent = RecentEnvelopes()
        """A prediction the broker delivered twice reaches the application once (``downlink_duplicates``)."""

    def accept(self, topic: str, payload: bytes) -> None:
        """Decode one message (chunks are reassembled first); malformed ones are counted, never raised."""
        try:
            got = self._inbox.accept(topic, payload)
            if got is None:
                return
            _, env = got
            message = decode_body(env)
            if env.kind is Kind.RECEIPT and message.device != self.device:
                raise ReceiptMismatchError(f"a receipt for {message.device!r} reached {self.device!r}")
        except WireError as exc:
            self.counters.reject(exc)
            log.warning("device %s: rejected downlink on %s: %s", self.device, topic, exc)  # pragma: no mutate
            return
        if not self._recent.accept(env.sender, env.seq, payload):
            self.counters.inc("downlink_duplicates")
            return
        self.counters.inc(f"received.{env.kind.value}")
        if env.kind is Kind.RECEIPT or env.kind is Kind.CONFIG:
            if self.on_delivery is not None:
                self.on_delivery(message)
            if env.kind is Kind.RECEIPT:
                return  # the SDK's business, not the application's
        if env.kind is Kind.REGISTER_REQUEST or (env.kind is Kind.ERROR and message.code == UNREGISTERED):
            if self.on_reregister is not None:
                self.on_reregister("request" if env.kind is Kind.REGISTER_REQUEST else "unregistered")
            if env.kind is Kind.REGISTER_REQUEST:
                return  # the SDK's business, not the application's
        if self.handler is not None:
            try:
                self.handler(env.kind, message)
            except Exception:  # a faulty user callback must not kill paho's loop
                self.counters.inc("callback_errors")
                log.exception("device %s: downlink callback failed", self.device)  # pragma: no mutate
