"""``DeviceClient``: what an IoT gateway embeds to talk to its megace edge.

A small synchronous API over paho-mqtt, callable from a plain firmware loop:
:meth:`connect`, :meth:`register`, :meth:`publish`, :meth:`request_inference`,
downlink messages through a callback, :meth:`flush`, :meth:`close`.

Delivery: every publish is QoS 1 and stamped with a per-device sequence number
that survives restarts. While the broker is reachable records go straight out;
when it is not, they go to a bounded on-disk queue (:mod:`device_sdk.store`), and
un-acknowledged ones are moved there too. After a reconnect the queue drains
strictly in order before new records go direct, and the edge drops repeated
sequence numbers, so each record arrives exactly once and in order. With an edge
that sends receipts, a record is kept until the edge says it logged it, and
re-sent if the broker lost it after acknowledging (:mod:`device_sdk.receipts`).

Threads: paho's network loop runs in its own thread (one per connection), and a
supervisor thread named ``megace-sdk:<device>`` reconnects with backoff and
drains the queue. Downlink callbacks run in paho's thread: keep them short and
do not call :meth:`flush` from them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from broker import topics
from broker.address import BrokerAddress
from broker.chunking import DEFAULT_MAX_PACKET, frames
from broker.metrics import Counters
from broker.protocol import Negotiator, probe_v5
from broker.signing import Verifier, load_public_key
from broker.wire import CapabilityProfile, FeatureBatch, FeatureRecord, Kind, Prediction, Status, encode_envelope
from broker.wire.status import OFFLINE, ONLINE
from device_sdk.batcher import Batcher
from device_sdk.downlink import DownlinkHandler, DownlinkReceiver
from device_sdk.events import LinkEvents
from device_sdk.link import connect_args, paho_client
from device_sdk.local_model import LocalModel
from device_sdk.metrics import DeviceMetrics
from device_sdk.model_installer import ModelInstaller
from device_sdk.receipts import DeliveryReceipts, ReceiptBook
from device_sdk.requests import InferenceRequests, RequestBook
from device_sdk.store import DiskQueue, Overflow, default_store_path
from device_sdk.supervisor import Supervisor
from device_sdk.window import Window

log = logging.getLogger(__name__)

_SENT: dict[Kind, str] = {k: f"sent.{k.value}" for k in Kind}
_REAP_AT = 32  # queued paho events that make a publish apply them (the supervisor and every wait do anyway)


class DeviceClient(InferenceRequests, LinkEvents, DeliveryReceipts):
    """One device's connection to the bus (one instance per device id).

    Args:
        site: The site (edge) this device belongs to; it picks the topics the device publishes on
            and listens to. 1 to 64 characters from ``[A-Za-z0-9_-]`` (portable across brokers: no dots).
        device: This device's id, unique within its site; it names the MQTT client id
            (``megace-dev-<site>-<device>``) and the on-disk queue. Same character rules as ``site``.
        broker: Where to connect: a ``BrokerAddress`` or a URL such as ``mqtt://host:1883`` or
            ``mqtts://user:pass@host:8883``. ``?protocol=auto`` (MQTT 5 where the broker has it, else 3.1.1),
            ``5`` or ``3.1.1`` (the default) picks the MQTT version; with MQTT 5 the broker keeps the device's session
            ``?session_expiry=`` seconds after it left (default one day; 3.1.1: no limit).
        on_downlink: Called from the network thread with the envelope kind and the decoded message
            (``DeviceConfig``, ``Prediction``, ``DeviceFeedback``, ...) for every downlink addressed to
            this device. Keep it short; an exception in it is counted (``callback_errors``)
            and the next message is still delivered.
        store_path: The sqlite file of the store-and-forward queue and the reserved sequence
            numbers. Default: ``$MEGACE_STATE_DIR/device/<device>.sqlite`` or
            ``~/.local/state/megace/device/<device>.sqlite``. Keep it on persistent storage: it is
            what makes sequence numbers survive a reboot.
        store_max_records: How many records the on-disk queue holds while the broker is
            unreachable before ``overflow`` applies.
        overflow: What a full queue does with one more record: ``drop-oldest`` (default),
            ``drop-newest`` (both counted) or ``error`` (``publish`` raises ``QueueFullError``).
        max_inflight: Record messages published and not yet acknowledged by the broker that the client
            has on the wire at once (MQTT's in-flight window; kept by :mod:`device_sdk.window`, not paho).
        max_unacked: Records published and not yet acknowledged that the client keeps in memory
            before ``publish`` blocks (back-pressure); at least ``max_inflight``. On a disconnect they
            go back to the queue in order and are counted as ``requeued``.
        max_packet: The largest MQTT packet to send; bigger payloads are split into chunks (many
            brokers cap packets at 128 KB or 1 MB).
        reconnect_max_delay: The cap, in seconds, of the exponential back-off between reconnects.
        linger_ms: With a value above 0, :meth:`publish` batches: records wait up to this long and travel
            together as one ``features_batch`` message (stacked arrays), up to ``batch_max`` records or
            ``batch_bytes`` bytes of arrays (see :mod:`device_sdk.batcher`). 0 (default): one message per record.
        batch_max: Records per batch (1 to 4096), for lingering and :meth:`publish_many`.
        batch_bytes: Array bytes per batch; default ``max_packet`` minus 4 KiB, so a batch is never chunked.
        edge_key: The edge's Ed25519 public key (a PEM file, as ``megace provision`` writes it): with it,
            every downlink must be signed by that key, and forged or unsigned ones are dropped and
            counted instead of reaching ``on_downlink``. Without it, downlinks are not checked.
        model_dir: Where to keep the edge's inference model (needs the ``local`` extra, onnxruntime): the device
            registers with ``local_model``, installs each ``model`` downlink that passes its checks (see
            :mod:`device_sdk.local_model`) and :meth:`predict` runs on the device. None: no local model.
        metrics_interval: Seconds between the device's retained JSON metrics (queue, drops, acks, round trip,
            last error, model version: :mod:`device_sdk.metrics`); 0 publishes them only on close.
        max_unreceipted: With an edge that sends receipts, record messages acknowledged by the broker and not yet
            receipted (plus those in flight) that the client keeps in memory before ``publish`` blocks
            (back-pressure; nothing is dropped). On a disconnect or close they go back to the disk queue.
        receipt_timeout_s: When the edge's receipts made no progress this long, the oldest held record is re-sent
            (same seq, ``resent``) as a probe, backing off; records a receipt lists as missing, or that a
            receipted record acknowledged later overtook, go again at once. :meth:`wait_delivered` waits for receipts.
        infer_retry_s: A request the broker acknowledged and no answer completed this long is published again (same
            seq and bytes), doubling the wait; 0: never. Each request gets one answer (:mod:`device_sdk.requests`).
        infer_max_tries: Publishes of one request before it is given up (``infer_given_up``).
    """

    def __init__(
        self,
        site: str,
        device: str,
        broker: BrokerAddress | str = "mqtt://127.0.0.1:1883",
        *,
        on_downlink: DownlinkHandler | None = None,
        store_path: str | Path | None = None,
        store_max_records: int = 100_000,
        overflow: Overflow | str = Overflow.DROP_OLDEST,
        max_inflight: int = 100,
        max_unacked: int = 2000,
        max_packet: int = DEFAULT_MAX_PACKET,
        reconnect_max_delay: float = 5.0,
        edge_key: str | Path | None = None,
        linger_ms: float = 0.0,
        batch_max: int = 512,
        batch_bytes: int | None = None,
        model_dir: str | Path | None = None,
        metrics_interval: float = 5.0,
        max_unreceipted: int = 10_000,
        receipt_timeout_s: float = 5.0,
        infer_retry_s: float = 5.0,
        infer_max_tries: int = 4,
    ) -> None:
        self.site = topics.check_id(site, "site")
        self.device = topics.check_id(device, "device")
        self.address = BrokerAddress.from_url(broker) if isinstance(broker, str) else broker
        self.max_inflight = max_inflight
        self.max_unacked = max(max_unacked, max_inflight)
        self.max_packet = max_packet
        self.reconnect_max_delay = reconnect_max_delay
        self.counters = Counters()
        self.store = DiskQueue(store_path or default_store_path(device), max_records=store_max_records,
                               overflow=overflow)
        self._seq, self._seq_end = self.store.reserve_seq()
        # the Condition's own RLock: the per-record path enters it directly (C), not through Condition.__enter__
        self._mutex = threading.RLock()
        self._lock = threading.Condition(self._mutex)
        self._client: mqtt.Client | None = None
        self._online = False
        self._closing = False
        # paho mid -> (seq, topic, payload, row_id): a plain tuple, the cheapest thing to build per record;
        # row_id is set when the record came from the on-disk queue
        self._inflight: dict[int, tuple[int, str, bytes, int | None]] = {}
        self._last_sent_row: int | None = None
        verifier = None if edge_key is None else Verifier([load_public_key(edge_key)])
        self.model = None if model_dir is None else LocalModel(model_dir, counters=self.counters)
        self._installer = None if self.model is None else ModelInstaller(self.model, self._model_installed)
        handler = on_downlink if self._installer is None else self._installer.wrap(on_downlink)
        self.metrics = DeviceMetrics(self, metrics_interval)
        self._requests = RequestBook(infer_retry_s, infer_max_tries, self.counters)
        handler = self._requests.wrap(self.metrics.wrap(handler))  # one answer per request, then the app's
        self._downlink = DownlinkReceiver(self.device, self.counters, handler, verifier, self._on_reregister,
                                          self._on_delivery)
        self._supervisor: Supervisor | None = None
        self.protocol = Negotiator(self.address.protocol, name=f"device {device}", counters=self.counters)
        """The MQTT version (the address's ``protocol``: auto, 5 or 3.1.1), remembered across reconnects."""
        self._registration: tuple[str, dict[str, Any]] | None = None
        self._registration_seq: int | None = None  # the seq register() returned, until it is published
        self._events: deque[tuple[str, Any]] = deque()
        self._window = Window(max_inflight, self._events)  # paho's own window is off (device_sdk.window)
        self._wake = threading.Event()
        self._status_topic = topics.status(topics.Role.DEVICE, self.device, self.site)
        self._features_topic = topics.device_up(self.site, self.device, topics.Uplink.FEATURES)
        self._book = ReceiptBook(self._features_topic, max(max_unreceipted, 1), receipt_timeout_s, self.counters)
        self.linger_ms = linger_ms
        self._batcher = Batcher(self._send_batch, self._next_seq, linger_ms=linger_ms, batch_max=batch_max,
                                batch_bytes=batch_bytes if batch_bytes is not None else max_packet - 4096)

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def online(self) -> bool:
        return self._online

    def connect(self, timeout: float = 10.0) -> bool:
        """Start connecting (and reconnecting) in the background; True once online within ``timeout``.

        Returning False is not an error: publishes are stored on disk until the broker is reachable.
        """
        if self._supervisor is None:
            self._supervisor = Supervisor(self)
            self._supervisor.start()
            self.metrics.start()
        deadline = time.monotonic() + timeout
        with self._lock:
            while not self._online:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(min(left, 0.05))
            return True

    def close(self, timeout: float = 10.0) -> bool:
        """Flush what can be flushed within ``timeout``, announce offline, disconnect. True if nothing is left."""
        with self._lock:
            self._batcher.flush()  # offline, an open batch goes to the store like any record
        start = time.monotonic()
        drained = self.flush(timeout) if self._online else len(self.store) == 0
        if drained and self._online and self._book.held:  # give the edge's receipts a moment, then keep them
            self.wait_delivered(min(timeout - (time.monotonic() - start), self._book.timeout_s))
        with self._lock:
            self._closing = True
            client = self._client
            self._wake.set()
        self.metrics.close()  # the final figures, retained, before the offline status
        if client is not None and self._online:
            info = client.publish(self._status_topic, self._status(OFFLINE), qos=1, retain=True)
            info.wait_for_publish(2.0)
            client.disconnect()
            client.loop_stop()
        if self._supervisor is not None:
            self._supervisor.join(5.0)
        if self._installer is not None:
            self._installer.close()
        with self._lock:
            self._move_inflight_to_store()
            self._online = False  # a closed client is not online, whatever paho reported last
            self.store.close()
        return drained

    def __enter__(self) -> DeviceClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sending -----------------------------------------------------------------------------

    def register(self, profile: CapabilityProfile) -> int:
        """Announce the device's capabilities (retained, so a restarted edge sees it); returns its seq."""
        if profile.device != self.device:
            raise ValueError(f"profile is for {profile.device!r}, this client is {self.device!r}")
        topic = topics.device_up(self.site, self.device, topics.Uplink.REGISTER)
        if self.model is not None:
            self.model.set_profile(profile)
            profile = replace(profile, local_model=True, model_version=self.model.version)
        with self._lock:
            self._registration = (topic, replace(profile, epoch=self.store.epoch()).to_body())
            self._registration_seq = seq = self._next_seq()
            self._publish_registration()
        return seq

    def _publish_registration(self) -> None:
        """Publish the registration (retained) if online (caller holds the lock).

        Its seq is used once: every later connect re-sends it under a fresh seq. An edge reads a live
        registration whose seq is not above what it has seen as a device that lost its sequence store,
        and forgets its duplicate guard; re-sending the old seq after a reconnect made a record that
        the broker had not acknowledged count twice."""
        if self._registration is None or not self._online or self._client is None:
            return
        topic, body = self._registration
        seq = self._registration_seq if self._registration_seq is not None else self._next_seq()
        self._registration_seq = None
        body = {**body, "resend_from": self._resend_from(seq)}  # receipts: no seq below it will come again
        self._client.publish(topic, encode_envelope(Kind.REGISTER, self.device, seq, body), qos=1, retain=True)

    def publish(self, record: FeatureRecord) -> int:
        """Publish one feature record at QoS 1 (or store it if offline); returns the seq of its envelope.

        With ``linger_ms > 0`` the record joins the open batch (a record with ``quality`` goes alone)."""
        if self.linger_ms <= 0 or record.quality:
            body = record.to_body()  # outside the lock: paho's thread may take it meanwhile
            with self._mutex:
                if self.linger_ms > 0 and len(self._batcher):  # without linger, publish_many leaves none open
                    self._batcher.flush()  # records leave in publish order
                return self._send(Kind.FEATURES, self._features_topic, body)
        with self._lock:
            seq = self._batcher.add(record)
            if len(self._batcher) == 1:
                self._wake.set()  # the supervisor times the linger of the batch just opened
            return seq

    def publish_many(self, records: Iterable[FeatureRecord]) -> list[int]:
        """Publish records a gateway already holds as ``features_batch`` messages now (no linger).

        Records join any open batch; consecutive records of one layout share a message, up to ``batch_max``
        records or ``batch_bytes`` bytes. Returns each record's envelope seq, in order."""
        seqs = []
        with self._lock:
            for record in records:
                if record.quality:
                    self._batcher.flush()
                    seqs.append(self._send(Kind.FEATURES, self._features_topic, record.to_body()))
                else:
                    seqs.append(self._batcher.add(record))
            self._batcher.flush()
        return seqs

    def _send_batch(self, batch: FeatureBatch, seq: int) -> None:
        self._send(Kind.FEATURES_BATCH, self._features_topic, batch.to_body(), seq=seq)
        self.counters.inc("sent.batched_records", batch.count)

    def predict(self, record: FeatureRecord) -> Prediction | int:
        """A ``Prediction`` computed on the device when a local model is installed; otherwise (or if it fails,
        counted ``predict.local_errors``) the seq of an inference request to the edge, whose answer arrives on
        the downlink (``predict.edge``). A record the local model cannot read raises ``ModelInputError``."""
        if self.model is not None:
            local = self.model.prediction(record)
            if local is not None:
                return local
        self.counters.inc("predict.edge")
        return self.request_inference(record)

    def _model_installed(self, version: int) -> None:
        """A new model is in use (installer thread): re-announce the registration (so the edge does not send it
        again) and the status with its version."""
        with self._lock:
            if self._registration is not None:
                topic, body = self._registration
                self._registration = (topic, {**body, "model_version": version})
                self._publish_registration()
            if self._online and self._client is not None:
                self._client.publish(self._status_topic, self._status(ONLINE), qos=1, retain=True)

    def _next_seq(self) -> int:
        if self._seq >= self._seq_end:
            self._seq, self._seq_end = self.store.reserve_seq()
        seq = self._seq
        self._seq += 1
        return seq

    def _send(self, kind: Kind, topic: str, body: dict[str, Any], *, seq: int | None = None,
              payload: bytes | None = None) -> int:
        """Encode and publish (or store) one envelope. The caller holds ``self._lock`` exactly once: the
        back-pressure wait releases it for paho's acknowledgements, which a nested hold would block.

        The per-record path of every publish: each test here is a plain attribute or ``len`` (see the
        benchmark in bench/bench_sdk.py, which holds it against raw paho)."""
        if seq is None:
            seq = self._seq
            if seq < self._seq_end:
                self._seq = seq + 1
            else:
                seq = self._next_seq()
        if payload is None:
            payload = encode_envelope(kind, self.device, seq, body)
        if len(payload) <= self.max_packet:
            self._send_part(topic, payload, seq)
        else:
            for t, p in frames(topic, payload, sender=self.device, seq=seq, max_packet=self.max_packet):
                self._send_part(t, p, seq)
        self.counters.inc(_SENT[kind])
        return seq

    def _send_part(self, topic: str, payload: bytes, seq: int) -> None:
        """Publish one MQTT message of a record now, or queue it on disk (caller holds the lock once)."""
        if len(self._events) >= _REAP_AT:  # acks are reaped in batches: one pass per message costs more
            self._process_events()
        store = self.store
        if self._online:
            if not store.count and len(self._inflight) >= self.max_unacked:
                # back-pressure: wait for acks rather than spill to disk; resume at 3/4 so the
                # publisher and paho's thread do not ping-pong once per acknowledgement
                self._process_events()
                low = self.max_unacked * 3 // 4
                while self._online and not store.count and len(self._inflight) > low:
                    self._wait_for_acks(0.05, len(self._inflight) - low)  # woken at the low mark, not polling
            if self._book.enabled:
                self._hold_back()  # receipts: at most max_unreceipted held (device_sdk.receipts)
            client = self._client
            if self._online and not store.count and client is not None:
                self._window.submit(client, topic, payload, (seq, topic, payload, None), self._inflight)
                return
        if not store.append(seq, topic, payload):
            self.counters.inc("dropped_newest")
        self._wake.set()

    def _publish_now(self, topic: str, payload: bytes, *, seq: int, row_id: int | None = None) -> None:
        client = self._client
        if client is None or not self._online:
            if row_id is None:
                self.store.append(seq, topic, payload)
            return
        self._window.submit(client, topic, payload, (seq, topic, payload, row_id), self._inflight)

    def _connect_args(self) -> dict[str, Any]:
        """The session arguments of the next connect (supervisor); ``auto`` asks the broker once, first."""
        if self.protocol.undecided:
            self.protocol.probed(probe_v5(self.address, self.client_id))
        return connect_args(self.address, self.protocol.version)

    @property
    def client_id(self) -> str:
        """``megace-dev-<site>-<device>``: a device id is unique within its site only (brokers may be shared)."""
        return f"megace-dev-{self.site}-{self.device}"

    def _status(self, state: str) -> bytes:
        detail: dict[str, Any] = {"site": self.site}
        if self.model is not None:
            detail["model_version"] = self.model.version
        return Status(role=topics.Role.DEVICE.value, id=self.device, state=state, detail=detail).encode()

    def _new_client(self) -> mqtt.Client:
        c = paho_client(self.address, self.client_id, will=(self._status_topic, self._status(OFFLINE)),
                        max_inflight=0, version=self.protocol.version)  # the window is self._window
        c.on_connect, c.on_disconnect = self._on_connect, self._on_disconnect
        c.on_publish, c.on_message = self._on_publish, self._on_message
        return c
