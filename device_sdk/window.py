"""The records' MQTT in-flight window, kept by the SDK rather than by paho.

Why: paho enforces ``max_inflight_messages_set`` by scanning its whole queue of messages on every PUBACK
(``Client._update_inflight`` walks every in-flight message to find the next queued one), a Python loop that
cost about a fifth of paho's network thread per message at a window of 100 (py-spy, bench/bench_sdk.py). Here
paho's own window is off (0) and the client keeps at most ``size`` record messages unacknowledged on the
wire: the rest wait in order in :attr:`Window.ready`, and each PUBACK frees a slot that the next one takes,
from paho's thread, as paho would have done.

Threads and locks: the caller side (whoever holds the client's lock) and paho's network thread both publish
through here, under :attr:`Window.lock`, so record messages reach paho in the order they were submitted. Paho
calls ``on_publish`` holding its own mutex, and ``publish`` takes that mutex: so paho's thread only ever
*tries* the window lock (never waits for it); an ack it could not apply waits in ``freed`` for the next
holder. The client's in-flight map (mid -> record) belongs to the client's lock: a message queued here sits
in it under a negative placeholder key; when the caller side publishes it, the key is replaced at once, and
when paho's thread does, it queues a ``("sent", [(key, mid), ...])`` event, which reaches the client before
that message's ack (both come from the same thread).
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from typing import Any

import paho.mqtt.client as mqtt

Item = tuple[int, str, bytes, "int | None"]  # (seq, topic, payload, row id of the disk queue or None)
_OK = (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN)
log = logging.getLogger("device_sdk.client")


class Window:
    """At most ``size`` record messages unacknowledged on one connection; the rest wait here, in order."""

    def __init__(self, size: int, events: deque[tuple[str, Any]]) -> None:
        self.size = max(size, 1)
        self.lock = threading.Lock()
        self.ready: deque[tuple[int, str, bytes]] = deque()  # (placeholder key, topic, payload), in order
        self.freed: deque[tuple[Any, int]] = deque()  # (client, mid) of PUBACKs not yet applied here
        self._wire: set[int] = set()  # mids of record messages on the wire
        self._slots = self.size
        self._client: mqtt.Client | None = None
        self._events = events
        self._keys = itertools.count(-1, -1)

    @property
    def on_wire(self) -> int:
        """Record messages published and not acknowledged (never above ``size``)."""
        return len(self._wire)

    def reset(self, client: mqtt.Client | None) -> None:
        """A new connection (or none): nothing is on the wire, nothing waits (caller holds the client's lock and has
        moved every unacknowledged record, queued ones included, to the disk queue)."""
        with self.lock:
            self._client = client
            self._slots = self.size
            self._wire.clear()
            self.ready.clear()
            self.freed.clear()

    def submit(self, client: mqtt.Client, topic: str, payload: bytes, item: Item,
               inflight: dict[int, Item]) -> None:
        """Publish now if a slot is free and nothing waits, else queue behind the rest (caller holds the client's
        lock); either way ``item`` is in ``inflight`` until acknowledged."""
        with self.lock:
            if self.freed:
                self._apply_freed()
            if self.ready or self._slots <= 0 or client is not self._client:
                key = next(self._keys)
                inflight[key] = item
                self.ready.append((key, topic, payload))
                if self._slots > 0 and client is self._client:  # a full window (the usual case) has nothing to pump
                    for key, mid in self._pump(client):
                        inflight[mid] = inflight.pop(key)
                return
            inflight[self._publish(client, topic, payload)] = item

    def pump(self, inflight: dict[int, Item]) -> None:
        """Apply acks paho's thread could not, and fill free slots (caller holds the client's lock)."""
        if not (self.freed or (self.ready and self._slots > 0)):
            return
        with self.lock:
            self._apply_freed()
            if self._client is not None:
                for key, mid in self._pump(self._client):
                    item = inflight.pop(key, None)
                    if item is not None:
                        inflight[mid] = item

    def acked(self, client: mqtt.Client, mid: int) -> None:
        """Paho's thread: a PUBACK came. Frees the slot and publishes the next waiting message if the lock is
        free; otherwise leaves it to the holder (paho holds its own mutex here: waiting could deadlock)."""
        if not self.lock.acquire(blocking=False):
            self.freed.append((client, mid))  # the holder applies it (or the next ack that gets the lock)
            return
        sent: list[tuple[int, int]] = []
        try:
            if self.freed:
                self._apply_freed()  # acks that came while the lock was held: older than this one
            if client is self._client:
                wire = self._wire
                if mid in wire:
                    wire.discard(mid)
                    self._slots += 1
                if self.ready:
                    self._pump(client, sent)
        except Exception:  # an exception here would end paho's network loop; the next holder tries again
            log.exception("publishing the next queued record failed")  # pragma: no mutate
        finally:
            if sent:
                self._events.append(("sent", sent))
            self.lock.release()

    # -- under self.lock --------------------------------------------------------------------------

    def _apply_freed(self) -> None:
        freed, wire = self.freed, self._wire
        while freed:
            client, mid = freed.popleft()
            if client is self._client and mid in wire:
                wire.discard(mid)
                self._slots += 1

    def _pump(self, client: mqtt.Client, sent: list[tuple[int, int]] | None = None) -> list[tuple[int, int]]:
        """Publish waiting messages into free slots, in order; ``sent`` gets (placeholder key, mid) of each."""
        sent = [] if sent is None else sent
        ready = self.ready
        while self._slots > 0 and ready:
            key, topic, payload = ready[0]
            mid = self._publish(client, topic, payload)
            ready.popleft()
            sent.append((key, mid))
        return sent

    def _publish(self, client: mqtt.Client, topic: str, payload: bytes) -> int:
        info = client.publish(topic, payload, qos=1)
        if info.rc not in _OK:
            raise ConnectionError(f"paho refused to publish: {mqtt.error_string(info.rc)}")
        self._slots -= 1
        self._wire.add(info.mid)
        return info.mid


__all__ = ["Item", "Window"]
