"""The upload outbox: a round's adapter stays here until the cloud itself says what became of it.

Why not until the broker's PUBACK: the broker accepting an upload says nothing about the cloud. A
cloud that refused an upload for a passing reason (its reassembly budget full) or never saw it (it
was down, the chunks timed out) must get it again; an upload the cloud accepted or refused for its
content must not be sent again. So the head of the outbox is published, then re-published with
backoff until a site feedback lists its seq as accepted or rejected (:meth:`Outbox.settle`), one
upload at a time, in seq order, so the cloud never sees a newer seq before an older one it lacks.

An upload enters only after the checkpoint that holds it committed: after a crash it is re-sent
with the same seq and the same bytes, and the cloud, which de-duplicates by (edge, seq), answers
``duplicate`` for one it already has.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator

import aiomqtt

from broker.aio import publish, wait_event
from broker.metrics import Counters
from edge_agent.state import StateStore

log = logging.getLogger(__name__)

RETRYABLE = frozenset({"chunk_limit", "bad_chunk", "chunk_hash"})
"""Refusals that say nothing about the upload's content: it is sent again (after backoff)."""


class Outbox:
    """Checkpointed uploads awaiting the cloud's verdict, oldest first, and the loop that sends them.

    Args:
        counters: Where ``uploads`` (first publishes), ``upload_resends``, ``uploads_settled``,
            ``uploads_refused`` (settled by a refusal), ``uploads_dropped`` (past ``limit``) and
            ``bytes_up`` are counted.
        store: The state store whose ``confirm(seq)`` records that every upload up to ``seq`` is settled.
        edge_id: The sender id stamped on chunk frames.
        topic: The cloud upload topic of this edge's site.
        limit: Uploads that may wait at once; past it the oldest are dropped, since a newer adapter
            supersedes an older one.
        max_packet: The largest MQTT packet to send; bigger uploads go as chunks.
        retry_s: Wait for a verdict after the first publish before publishing again; doubles with each
            try, up to ``max_retry_s``.
        on_sent: Called after each publish and each verdict (the service wakes its metrics publisher).
    """

    def __init__(self, counters: Counters, store: StateStore, *, edge_id: str, topic: str, limit: int,
                 max_packet: int, retry_s: float = 30.0, max_retry_s: float = 600.0,
                 on_sent: Callable[[], None] = lambda: None) -> None:
        self.counters = counters
        self.store = store
        self.edge_id = edge_id
        self.topic = topic
        self.limit = limit
        self.max_packet = max_packet
        self.retry_s = retry_s
        self.max_retry_s = max_retry_s
        self.on_sent = on_sent
        self._items: deque[tuple[int, bytes]] = deque()
        self._tries = 0  # publishes of the current head
        self._due = 0.0  # monotonic time the head is (re-)published at
        self._wake = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        return iter(list(self._items))

    @property
    def unsent(self) -> int:
        """Uploads never published yet (what a shutdown waits for)."""
        return max(len(self._items) - (1 if self._tries else 0), 0)

    def extend(self, uploads: Iterable[tuple[int, bytes]]) -> None:
        """Add checkpointed uploads in seq order and wake the sender; the oldest past ``limit`` are dropped."""
        self._items.extend(uploads)
        while len(self._items) > self.limit:
            self._pop_head()
            self.counters.inc("uploads_dropped")
        self._wake.set()

    def settle(self, seq: int, reason: str | None) -> None:
        """The cloud's verdict on ``seq``: None (accepted) or the refusal's reason. Unknown seqs are ignored."""
        index = next((i for i, (s, _) in enumerate(self._items) if s == seq), None)
        if index is None:
            return
        if reason in RETRYABLE:
            if index == 0:
                self.counters.inc("upload_refused_retryable")
                self._due = min(self._due, time.monotonic() + self._backoff())
            return
        if reason is not None:
            self.counters.inc("uploads_refused")
            log.warning("edge %s: cloud refused upload %d: %s", self.edge_id, seq, reason)
        self.counters.inc("uploads_settled")
        if index == 0:
            self._pop_head()
            self.store.confirm(seq)
        else:
            del self._items[index]
        self.on_sent()
        self._wake.set()

    def _pop_head(self) -> None:
        self._items.popleft()
        self._tries, self._due = 0, 0.0

    def _backoff(self) -> float:
        return min(self.max_retry_s, self.retry_s * 2 ** max(self._tries - 1, 0))

    async def send(self, client: aiomqtt.Client) -> None:
        """Publish the head when due until cancelled; a new connection publishes it again at once."""
        self._due = 0.0
        while True:
            self._wake.clear()
            now = time.monotonic()
            if self._items and now >= self._due:
                seq, payload = self._items[0]
                sent = await publish(client, self.topic, payload, sender=self.edge_id, seq=seq, qos=1,
                                     max_packet=self.max_packet)
                self.counters.inc("uploads" if self._tries == 0 else "upload_resends")
                self.counters.inc("bytes_up", sent)
                self._tries += 1
                if self._items and self._items[0][0] == seq:
                    self._due = time.monotonic() + self._backoff()
                log.info("edge %s published adapter seq %d (%d bytes, try %d)", self.edge_id, seq, sent, self._tries)
                self.on_sent()
                continue
            timeout = None if not self._items else max(self._due - now, 0.0)
            await wait_event(self._wake, timeout)
