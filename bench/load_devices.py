"""Simulated devices for ``bench/load_test.py``: many MQTT device sessions per process, one thread.

Why not 1,000 :class:`device_sdk.DeviceClient` instances: each one runs a paho network thread (a
``select()`` loop) and a supervisor thread and holds 3 sqlite descriptors plus 1-2 sockets. Measured
here (paho 2.2, 2 cores): 250 DeviceClients in one process stalled at 88 online, because paho's
``select()`` cannot watch descriptors >= 1024 (FD_SETSIZE) and 250 devices need ~1,800 descriptors;
100 DeviceClients per process worked (0.22 cores for 1,000 records/s), so 1,000 real clients would take
>= 10 processes and 2,000 threads on a 2-core box that must also run the broker and the edge.

What is simulated instead, per device, with the wire-level behaviour of ``DeviceClient``:
its own TCP connection and MQTT session (paho, MQTT 3.1.1, ``clean_session=False``, client id
``megace-dev-<device>``, TCP_NODELAY, retained QoS 1 last will ``offline``, in-flight window 100), the
subscription to its downlink topics at QoS 1, the retained ``online`` status, the retained
registration (``encode_envelope(Kind.REGISTER, ...)``), then numbered, labelled feature records as
``encode_envelope(Kind.FEATURES, device, seq, FeatureRecord(...).to_body())`` at QoS 1 on the
device's features topic. Not simulated: the on-disk store-and-forward queue (the broker stays
reachable; a disconnect is counted and fails the run instead of being re-queued) and the SDK's
back-pressure (nothing blocks: paho queues beyond the in-flight window in memory).

All of a worker's connections share one ``selectors`` (epoll) loop, paho's external-loop API
(``loop_read`` / ``loop_write`` / ``loop_misc``); ``publish`` writes directly from that loop.
"""

from __future__ import annotations

import resource
import selectors
import socket
import time
from dataclasses import dataclass, field
from multiprocessing.sharedctypes import SynchronizedArray
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt

from broker import topics
from broker.wire import CapabilityProfile, FeatureRecord, Kind, ModalityProfile, Status, encode_envelope
from broker.wire.status import OFFLINE, ONLINE
from edge_agent.training.toy_task import ToyTask, toy_config

IN_FLIGHT = 100
"""DeviceClient's default ``max_inflight``."""


def toy_profile(device: str) -> CapabilityProfile:
    """``tests.support.edge_testkit.toy_profile`` (copied: importing the testkit pulls in torch)."""
    return CapabilityProfile(device=device, modalities={
        "imu": ModalityProfile(shape=(4, 6), rate_hz=10.0),
        "env": ModalityProfile(shape=(8,), rate_hz=1.0),
    })


def device_name(index: int) -> str:
    return f"load-{index:05d}"


def numbered_modalities(pool: list[dict[str, Any]], device_index: int, k: int) -> dict[str, np.ndarray]:
    """A toy sample whose ``env`` carries (device index, record number): exact in float32 below 2**24."""
    sample = pool[(device_index * 7 + k) % len(pool)]
    env = np.array(sample["modalities"]["env"], dtype=np.float32)
    flat = env.reshape(-1)  # (1, 8) in the toy task: a view of the copy
    flat[0], flat[1] = float(device_index), float(k)
    return {"imu": sample["modalities"]["imu"], "env": env}


@dataclass
class SimDevice:
    index: int
    name: str
    client: mqtt.Client
    connected: bool = False
    disconnects: int = 0
    seq: int = 0
    inflight: dict[int, tuple[int, float]] = field(default_factory=dict)
    """mid -> (record number or -1 for control messages, publish time)."""
    acked: bytearray = field(default_factory=bytearray)


@dataclass
class WorkerResult:
    worker: int
    devices: list[str]
    acked: dict[str, bytes]
    """Per device: one byte per record number, 1 where the broker PUBACKed it."""
    published: int
    acked_total: int
    disconnects: int
    connect_s: float
    publish_s: float
    ack_latency_ms: dict[str, float]
    cpu_s: float
    late_ticks: int


def _status(device: str, site: str, state: str) -> bytes:
    return Status(role=topics.Role.DEVICE.value, id=device, state=state, detail={"site": site}).encode()


def run_worker(worker: int, first: int, count: int, host: str, port: int, site: str, rate_hz: float,
               duration_s: float, start_at: Any, ready: Any, progress: SynchronizedArray, results: Any) -> None:
    """Worker process body: connect ``count`` devices, wait for ``start_at`` (wall clock, shared), publish, report."""
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    sel = selectors.DefaultSelector()
    devices: list[SimDevice] = []
    task = ToyTask(toy_config(), seed=100 + worker)
    pool = task.samples(256, modalities=("imu", "env"))
    per_device = round(rate_hz * duration_s)
    latencies: list[float] = []

    def on_connect(c: mqtt.Client, dev: SimDevice, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            return
        sock = c.socket()
        if isinstance(sock, socket.socket):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        dev.connected = True

    def on_disconnect(_c: mqtt.Client, dev: SimDevice, _f: Any, _r: Any, _p: Any) -> None:
        if dev.connected:
            dev.disconnects += 1
        dev.connected = False

    def on_publish(_c: mqtt.Client, dev: SimDevice, mid: int, _r: Any, _p: Any) -> None:
        got = dev.inflight.pop(mid, None)
        if got is not None and got[0] >= 0:
            dev.acked[got[0]] = 1
            latencies.append(time.perf_counter() - got[1])

    t_connect = time.monotonic()
    for i in range(first, first + count):
        name = device_name(i)
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"megace-dev-{name}", protocol=mqtt.MQTTv311,
                        clean_session=False)
        dev = SimDevice(i, name, c, acked=bytearray(per_device))
        c.user_data_set(dev)
        c.will_set(topics.status(topics.Role.DEVICE, name), _status(name, site, OFFLINE), qos=1, retain=True)
        c.max_inflight_messages_set(IN_FLIGHT)
        c.on_connect, c.on_disconnect, c.on_publish = on_connect, on_disconnect, on_publish
        c.connect(host, port, keepalive=60)
        sock = c.socket()
        assert sock is not None
        sel.register(sock, selectors.EVENT_READ, dev)
        devices.append(dev)

    def pump(timeout: float) -> None:
        for key, _ in sel.select(timeout):
            dev = key.data
            dev.client.loop_read()
        for dev in devices:
            if dev.client.want_write():
                dev.client.loop_write()

    deadline = time.monotonic() + 60
    while not all(d.connected for d in devices):
        if time.monotonic() > deadline:
            raise RuntimeError(f"worker {worker}: {sum(d.connected for d in devices)} of {count} connected")
        pump(0.05)

    def send(dev: SimDevice, topic: str, payload: bytes, number: int, *, retain: bool = False) -> None:
        info = dev.client.publish(topic, payload, qos=1, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS,):
            raise RuntimeError(f"{dev.name}: publish refused: {mqtt.error_string(info.rc)}")
        dev.inflight[info.mid] = (number, time.perf_counter())

    # what DeviceClient does on connect: subscribe downlinks, retained online status, retained registration
    for dev in devices:
        for f in topics.subscriptions(topics.device_downlinks(site, dev.name)):
            dev.client.subscribe(f, qos=1)
        send(dev, topics.status(topics.Role.DEVICE, dev.name), _status(dev.name, site, ONLINE), -1, retain=True)
        dev.seq += 1
        reg = encode_envelope(Kind.REGISTER, dev.name, dev.seq, toy_profile(dev.name).to_body())
        send(dev, topics.device_up(site, dev.name, topics.Uplink.REGISTER), reg, -1, retain=True)
    while any(d.inflight for d in devices):
        pump(0.05)
    connect_s = time.monotonic() - t_connect
    ready.release()

    # publish: the k-th message of this worker is due at start + k / (count * rate), round-robin over devices,
    # so every device sends exactly ``rate_hz`` records/s, evenly spaced
    feature_topics = [topics.device_up(site, d.name, topics.Uplink.FEATURES) for d in devices]
    while start_at.value == 0.0:
        pump(0.05)
    start = start_at.value
    total = per_device * count
    worker_rate = count * rate_hz
    k = 0
    late_ticks = 0
    last_misc = time.monotonic()
    while k < total:
        now = time.time()
        due = min(total, int((now - start) * worker_rate) + 1) if now >= start else 0
        if due - k > worker_rate * 0.05:
            late_ticks += 1  # more than 50 ms behind schedule
        while k < due:
            j = k % count
            n = k // count
            dev = devices[j]
            dev.seq += 1
            label = int(pool[(dev.index * 7 + n) % len(pool)]["label"])
            body = FeatureRecord(dev.name, n, numbered_modalities(pool, dev.index, n), label=label)
            send(dev, feature_topics[j], encode_envelope(Kind.FEATURES, dev.name, dev.seq, body.to_body()), n)
            k += 1
        progress[2 * worker] = k
        progress[2 * worker + 1] = len(latencies)
        next_due = start + (k / worker_rate)
        pump(max(0.0, min(0.01, next_due - time.time())))
        if time.monotonic() - last_misc > 1.0:
            for dev in devices:
                dev.client.loop_misc()
            last_misc = time.monotonic()
    publish_s = time.time() - start
    deadline = time.monotonic() + 120
    while any(d.inflight for d in devices) and time.monotonic() < deadline:
        pump(0.05)
        progress[2 * worker + 1] = len(latencies)
    progress[2 * worker + 1] = len(latencies)
    disconnects = sum(d.disconnects for d in devices)  # before our own disconnects below
    # close as DeviceClient.close does: retained offline status, then disconnect
    for dev in devices:
        if dev.connected:
            send(dev, topics.status(topics.Role.DEVICE, dev.name), _status(dev.name, site, OFFLINE), -1, retain=True)
    deadline = time.monotonic() + 10
    while any(d.inflight for d in devices) and time.monotonic() < deadline:
        pump(0.05)
    for dev in devices:
        dev.client.disconnect()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    lat = np.asarray(latencies) * 1e3 if latencies else np.zeros(1)
    results.put(WorkerResult(
        worker=worker, devices=[d.name for d in devices], acked={d.name: bytes(d.acked) for d in devices},
        published=k, acked_total=len(latencies), disconnects=disconnects,
        connect_s=connect_s, publish_s=publish_s,
        ack_latency_ms={"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
                        "max": float(lat.max())},
        cpu_s=(r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime), late_ticks=late_ticks,
    ))
