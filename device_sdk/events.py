"""The client's side of paho's callbacks: the events they queue and how they are applied.

A mixin of :class:`~device_sdk.client.DeviceClient`, kept in its own file for reading: paho calls the
``_on_*`` methods from its network thread while holding its own mutexes, so they only queue an event;
whichever thread holds the client's lock next applies them (acks free the in-flight window and delete
drained rows, a connect re-subscribes, re-announces and restarts the drain, a disconnect puts un-acked
records back at the head of the disk queue).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt

from broker import topics
from broker.metrics import Counters
from broker.wire.status import ONLINE
from device_sdk.link import set_nodelay

if TYPE_CHECKING:
    from broker.protocol import Negotiator
    from device_sdk.downlink import DownlinkReceiver
    from device_sdk.receipts import ReceiptBook
    from device_sdk.store import DiskQueue
    from device_sdk.window import Window

log = logging.getLogger("device_sdk.client")
REREGISTER_MIN_INTERVAL_S = 1.0
_NEVER = float("inf")


class LinkEvents:
    """Paho's callbacks and the event queue they feed (state is the client's: declared here for reading)."""

    site: str
    device: str
    counters: Counters
    store: DiskQueue
    _lock: threading.Condition
    _wake: threading.Event
    _events: deque[tuple[str, Any]]
    _inflight: dict[int, tuple[int, str, bytes, int | None]]  # mid (or a queued one's placeholder) -> record
    _window: Window
    _client: mqtt.Client | None
    _online: bool
    _last_sent_row: int | None
    _status_topic: str
    _downlink: DownlinkReceiver
    _book: ReceiptBook
    protocol: Negotiator
    _last_reregister: float = float("-inf")
    _acks_seen = 0  # PUBACKs paho's thread reported (only it writes this)
    _ack_target: float = float("inf")  # the count at which it wakes a waiter (see _wait_for_acks)

    def _status(self, state: str) -> bytes:
        raise NotImplementedError

    def _publish_registration(self) -> None:
        raise NotImplementedError

    if TYPE_CHECKING:  # device_sdk.receipts.DeliveryReceipts, the client's other mixin
        def _delivery_event(self, message: Any) -> None: ...
        def _resend_due(self) -> None: ...
        def _held_to_store(self) -> None: ...

    # -- paho callbacks (paho's network thread) ----------------------------------------------
    # paho holds its own mutexes while calling these, so they never take ``self._lock``
    # (that would deadlock against a publish holding it); they queue an event instead.

    def _on_connect(self, client: mqtt.Client, _ud: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            log.warning("device %s: broker refused connection: %s", self.device, reason)  # pragma: no mutate
            self._events.append(("refused", (client, reason)))  # auto: maybe MQTT 5 was refused (3.1.1 next)
            self._wake.set()
            return
        set_nodelay(client)
        self._events.append(("connected", client))
        self._wake.set()

    def _on_disconnect(self, client: mqtt.Client, _ud: Any, _flags: Any, reason: Any, _props: Any) -> None:
        self._events.append(("disconnected", client))
        self._wake.set()

    def _on_publish(self, _c: mqtt.Client, _ud: Any, mid: int, _reason: Any, _props: Any) -> None:
        self._events.append(("ack", mid))  # reaped in batches; see _wait_for_acks
        self._window.acked(_c, mid)  # frees its slot: the next queued record goes out now, from this thread
        seen = self._acks_seen + 1
        self._acks_seen = seen
        if seen >= self._ack_target:  # a waiter asked to be woken at this many
            self._ack_target = _NEVER
            self._wake.set()

    def _on_message(self, _c: mqtt.Client, _ud: Any, msg: mqtt.MQTTMessage) -> None:
        self._downlink.accept(msg.topic, msg.payload)

    # -- event processing (any thread holding ``self._lock``) --------------------------------

    def _wait_for_acks(self, timeout: float, acks: int | None = None) -> None:
        """Release the lock until ``acks`` more PUBACKs came (default: as many as are in flight), a connection
        event or ``timeout``, then apply queued events.

        Paho's thread counts acks and wakes the waiter once, at the count it asked for: waking it per PUBACK
        would make it fight paho's network thread for the GIL on every message (measured: half the throughput),
        and polling woke it every few milliseconds for a handful of acks.
        """
        if not self._events:
            self._ack_target = self._acks_seen + max(len(self._inflight) if acks is None else acks, 1)
            self._lock.release()
            try:
                self._wake.wait(timeout)
                self._wake.clear()
            finally:
                self._ack_target = _NEVER
                self._lock.acquire()
        self._process_events()

    def _process_events(self) -> None:
        """Apply queued acks and connection changes (caller holds the lock)."""
        changed = False
        acked = 0
        events, inflight = self._events, self._inflight
        hold = self._book.hold if self._book.enabled else None  # PUBACKed records wait for the edge's receipt
        while events:
            what, arg = events.popleft()
            changed = True
            if what == "ack":
                pending = inflight.pop(arg, None)
                if pending is not None:
                    if pending[3] is not None:
                        self.store.delete(pending[3])
                    if hold is not None:
                        hold(pending)
                    acked += 1
            elif what == "sent":  # paho's thread published queued records: their placeholders become mids
                for key, mid in arg:
                    pending = inflight.pop(key, None)
                    if pending is not None:
                        inflight[mid] = pending
            elif what == "receipt":
                self._delivery_event(arg)
                hold = self._book.hold if self._book.enabled else None
            elif what == "refused":
                self.protocol.refused_code(arg[1])
            elif what == "reregister":
                self._reregister(arg)
            elif arg is not self._client:
                continue  # an event from a connection already replaced
            elif what == "connected":
                for f in topics.subscriptions(topics.device_downlinks(self.site, self.device)):
                    arg.subscribe(f, qos=1)
                arg.subscribe(topics.register_request(self.site), qos=1)  # exact: the edge's "register again"
                arg.publish(self._status_topic, self._status(ONLINE), qos=1, retain=True)
                self._window.reset(arg)
                self._online = True
                self.protocol.connected()
                self._publish_registration()
                self._last_sent_row = None
                self.counters.inc("connects")
            elif what == "disconnected":
                self._move_inflight_to_store()
                self._online = False
                self.counters.inc("disconnects")
        if acked:
            self.counters.inc("acked", acked)
        self._window.pump(inflight)  # acks paho's thread could not apply (it found the window held)
        if self._book.held:
            self._resend_due()
        if changed:
            self._lock.notify_all()

    def _on_reregister(self, why: str) -> None:
        """The edge asked for the registration again (paho's thread): queue it like any event."""
        self._events.append(("reregister", why))
        self._wake.set()

    def _reregister(self, why: str) -> None:
        """Publish the registration again under a fresh seq (caller holds the lock). The edge's request always
        gets one; ``unregistered`` errors (a burst of refused records) get at most one per second."""
        if not self._online:
            return  # the next connect re-registers anyway
        now = time.monotonic()
        if why == "unregistered" and now - self._last_reregister < REREGISTER_MIN_INTERVAL_S:
            self.counters.inc("reregister_skipped")
            return
        self._last_reregister = now
        self._publish_registration()
        self.counters.inc(f"reregistered.{why}")

    def _move_inflight_to_store(self) -> None:
        """Un-acked direct publishes go back to the front of the disk queue (caller holds the lock).

        Rows that came from the queue are still in it. Either way every un-acked record is re-sent after
        the next connect; ``requeued`` counts them so an operator can see what a lost link cost.
        """
        self._window.reset(None)  # queued records are in _inflight too (placeholder keys): they go below
        self.counters.inc("requeued", len(self._inflight))
        direct = sorted((p for p in self._inflight.values() if p[3] is None), key=lambda p: p[0])
        self.store.prepend([(seq, topic, payload) for seq, topic, payload, _ in direct])
        self._held_to_store()  # PUBACKed, not receipted: re-sent first after the next connect
        self._inflight.clear()  # the next "connected" event restarts the drain at the head of the queue
