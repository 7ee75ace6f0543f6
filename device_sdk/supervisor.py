"""The SDK's background thread: keeps one device connected, reconnecting with backoff, and drains its queue.

Kept apart from :class:`~device_sdk.client.DeviceClient` (the facade the firmware calls) as its own
loop, the way aiokafka keeps its sender beside its producer. It works on the client's state under
the client's lock, through the client's private helpers: the two are one unit, split for reading.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from device_sdk.client import DeviceClient

log = logging.getLogger(__name__)


class Supervisor(threading.Thread):
    """``megace-sdk:<device>``, a daemon thread: a process that forgot ``close()`` still exits."""

    def __init__(self, client: DeviceClient) -> None:
        super().__init__(name=f"megace-sdk:{client.device}", daemon=True)
        self.client = client
        self._endpoint = 0  # which of the address's nodes the next connect uses; the next one after a failure

    def run(self) -> None:
        c = self.client
        while not c._closing:
            try:
                self._supervise_once()
            except Exception:  # the supervisor must outlive any single failure
                c.counters.inc("supervisor_errors")
                log.exception("device %s: supervisor step failed", c.device)  # pragma: no mutate
                time.sleep(0.1)

    def _supervise_once(self) -> None:
        c = self.client
        delay = 0.05
        while not c._closing:
            linger = self.flush_due()  # a lingering batch goes out on time, online or (to the store) not
            with c._lock:
                c._process_events()
                online, old = c._online, c._client
            if online:
                delay = 0.05
                with c._lock:
                    draining = self.drain()
                    if draining:
                        c._wait_for_acks(0.01)
                if not draining:
                    c._wake.wait(min(0.5, linger))
                    c._wake.clear()
                continue
            if old is not None:
                old.loop_stop()
                old.disconnect()
                self._endpoint += 1  # the connection was lost: try the cluster's next node (no-op with one)
            session = c._connect_args()  # before the client: ``auto`` may settle the version here
            client = c._new_client()
            node = c.address.endpoint(self._endpoint)
            try:
                client.connect(node.host, node.port, keepalive=c.address.keepalive, **session)
            except OSError:
                self._endpoint += 1
                with c._lock:
                    c._client = None
                c._wake.wait(min(delay, linger))
                delay = min(c.reconnect_max_delay, delay * 2)
                continue
            with c._lock:
                c._client = client
            client.loop_start()
            deadline = time.monotonic() + 10.0
            while not c._closing and time.monotonic() < deadline:
                c._wake.wait(0.1)
                c._wake.clear()
                self.flush_due()
                with c._lock:
                    c._process_events()
                    if c._online or c._client is not client:
                        break

    def flush_due(self) -> float:
        """Send the open batch if its linger ran out (supervisor); seconds until the next one is due."""
        c = self.client
        with c._lock:
            if c._batcher.due():
                c._batcher.flush()
            deadline = c._batcher.deadline
        return 3600.0 if deadline is None else max(deadline - time.monotonic(), 0.0)

    def drain(self) -> bool:
        """Publish queued rows in order, at most ``max_inflight`` unacknowledged; True while rows remain."""
        c = self.client
        if not c._online or len(c.store) == 0:
            return False
        room = c.max_unacked - len(c._inflight)
        if c._book.enabled:  # receipts: what awaits one counts against max_unreceipted too
            room = min(room, c._book.max_unreceipted - len(c._book.held) - len(c._inflight))
        for row_id, seq, topic, payload in c.store.peek(c._last_sent_row, max(room, 0)):
            c._publish_now(topic, payload, seq=seq, row_id=row_id)
            c._last_sent_row = row_id
        return True
