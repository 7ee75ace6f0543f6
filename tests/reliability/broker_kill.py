"""SIGKILL Mosquitto under QoS 1 load and count the records it acknowledged but never delivered.

A publisher with the device SDK's MQTT settings (MQTT 3.1.1, ``clean_session=False``, stable client
id, in-flight window 100, TCP_NODELAY) publishes numbered 1 KiB records at QoS 1 as fast as the
broker acknowledges them; a persistent-session subscriber (as the edge and cloud services are:
``clean_session=False``, re-subscribing on every connect) collects them. The broker is killed with
SIGKILL at random moments and restarted on the same port and state dir; paho re-sends what was not
acknowledged. A record the publisher holds a PUBACK for is the broker's promise: the publisher will
never send it again. Every such record the subscriber never receives is a loss.

Mosquitto 2.0 has no write-ahead log; it writes its whole database on autosave (and on SIGTERM).
What survives a SIGKILL is the last save, so the profiles below differ only in when it saves.

    python -m tests.reliability.broker_kill --kills 10 [--out bench/results/durability.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import struct
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from broker.runners import MosquittoBroker, free_port

TOPIC = "megace/v1/reliability/kill"
RETAINED = "megace/v1/reliability/retained"
PAYLOAD_BYTES = 1024

INFLIGHT = 100
"""QoS 1 publishes a publisher keeps unacknowledged (the device SDK's default window)."""


@dataclass(frozen=True)
class Profile:
    """When Mosquitto writes its database: after ``interval`` changes, or every ``interval`` seconds."""

    name: str
    autosave_interval: int
    autosave_on_changes: bool

    def broker(self, state_dir: Path, port: int) -> MosquittoBroker:
        return MosquittoBroker(port=port, state_dir=state_dir, persistence=True,
                               autosave_interval=self.autosave_interval,
                               autosave_on_changes=self.autosave_on_changes)


PROFILES = {p.name: p for p in (
    Profile("every-30s", 30, False),  # deploy/mosquitto/megace.conf before this change
    Profile("every-1s", 1, False),  # the test runner's setting before this change
    Profile("after-100-changes", 100, True),
    Profile("after-every-change", 1, True),  # deploy/mosquitto/durability.conf
)}


def _nodelay(client: mqtt.Client) -> None:
    sock = client.socket()
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Subscriber:
    """A persistent session that re-subscribes on every connect; notes whether the broker kept its session."""

    def __init__(self, port: int) -> None:
        self.received: set[int] = set()
        self.messages = 0
        self.connects = 0
        self.sessions_lost = 0  # reconnects the broker answered with session_present = 0
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"rel-sub-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv311, clean_session=False)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.reconnect_delay_set(0.05, 0.5)
        self.port = port

    def start(self) -> Subscriber:
        self.client.connect("127.0.0.1", self.port, keepalive=10)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise TimeoutError("subscriber never subscribed")
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client: mqtt.Client, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            return
        _nodelay(client)
        if self.connects and not flags.session_present:
            self.sessions_lost += 1
        self.connects += 1
        client.subscribe(TOPIC, qos=1)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        self.messages += 1
        self.received.add(struct.unpack_from(">Q", msg.payload)[0])


class Publishers:
    """Several device-like publishers, each in its own thread (Mosquitto reads one packet per socket per
    event-loop pass, so a save per pass costs a single connection far more than many)."""

    def __init__(self, port: int, count: int) -> None:
        self.all = [Publisher(port, i).start() for i in range(count)]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=p.run, args=(self._stop,), daemon=True) for p in self.all]

    def go(self) -> None:
        for t in self._threads:
            t.start()

    def halt(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)

    @property
    def published(self) -> int:
        return sum(p.published for p in self.all)

    @property
    def acked(self) -> set[int]:
        return set().union(*(p.acked for p in self.all))

    def sweep(self) -> int:
        return sum(p.sweep() for p in self.all)

    def drain(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        return all(p.drain(max(deadline - time.monotonic(), 0.0)) for p in self.all)

    def stop(self) -> None:
        for p in self.all:
            p.stop()


class Publisher:
    """Publishes numbered records at QoS 1, at most ``window`` unacknowledged; a record counts once PUBACKed."""

    def __init__(self, port: int, index: int = 0, window: int = 1000) -> None:
        self.window = window
        self.first = index << 40  # each publisher numbers its records in its own range
        self.acked: set[int] = set()
        self.published = 0
        self._pending: list[tuple[int, mqtt.MQTTMessageInfo]] = []
        self._filler = os.urandom(PAYLOAD_BYTES - 8)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"rel-pub-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv311, clean_session=False)
        self.client.max_inflight_messages_set(INFLIGHT)
        self.client.max_queued_messages_set(0)
        self.client.on_connect = lambda c, *a: _nodelay(c)
        self.client.reconnect_delay_set(0.05, 0.5)
        self.port = port

    def start(self) -> Publisher:
        self.client.connect("127.0.0.1", self.port, keepalive=10)
        self.client.loop_start()
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def sweep(self) -> int:
        """Move PUBACKed records to :attr:`acked`; how many are still unacknowledged."""
        still = []
        for seq, info in self._pending:
            if info.is_published():
                self.acked.add(seq)
            else:
                still.append((seq, info))
        self._pending = still
        return len(still)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            if len(self._pending) >= self.window and self.sweep() >= self.window:
                time.sleep(0.001)
                continue
            seq = self.first + self.published
            info = self.client.publish(TOPIC, struct.pack(">Q", seq) + self._filler, qos=1)
            self._pending.append((seq, info))
            self.published += 1

    def drain(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.sweep() and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self._pending


def plant_retained(port: int, nbytes: int, chunk: int = 256 * 1024) -> int:
    """Retained chunks like a chunked global adapter: state every save must write again."""
    if nbytes <= 0:
        return 0
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"rel-ret-{uuid.uuid4().hex[:8]}")
    c.connect("127.0.0.1", port)
    c.loop_start()
    infos = [c.publish(f"{RETAINED}/chunk/{i}", os.urandom(min(chunk, nbytes - off)), qos=1, retain=True)
             for i, off in enumerate(range(0, nbytes, chunk))]
    for info in infos:
        info.wait_for_publish(10)
    c.disconnect()
    c.loop_stop()
    return len(infos)


@dataclass
class KillRun:
    """One run: what was acknowledged, what arrived, and how each kill went."""

    profile: str
    kills: int
    seed: int
    publishers: int = 1
    published: int = 0
    acked: int = 0
    delivered_acked: int = 0
    lost: int = 0  # acknowledged to the publisher, never delivered to the subscriber
    lost_per_kill: list[int] = field(default_factory=list)
    unacked_at_end: int = 0
    subscriber_sessions_lost: int = 0
    subscriber_connects: int = 0
    duplicates: int = 0  # deliveries beyond the first (QoS 1 is at least once)
    retained_survived: bool = True
    seconds: float = 0.0
    acked_per_s: float = 0.0
    lost_sample: list[int] = field(default_factory=list)


def kill_run(profile: Profile, kills: int, *, seed: int = 0, publishers: int = 1,
             gap: tuple[float, float] = (0.5, 2.0), state_dir: Path | None = None, settle_s: float = 5.0) -> KillRun:
    """Publish under load, SIGKILL and restart the broker ``kills`` times, then count losses."""
    rng = random.Random(seed)
    out = KillRun(profile.name, kills, seed, publishers)
    with tempfile.TemporaryDirectory(prefix="megace-kill-") as tmp:
        broker = profile.broker(Path(state_dir or tmp), free_port())
        broker.start()
        try:
            plant_retained(broker.port, 1024)
            sub = Subscriber(broker.port).start()
            pub = Publishers(broker.port, publishers)
            t0 = time.monotonic()
            pub.go()
            marks: list[list[int]] = []  # per kill: how many records each publisher had published
            for _ in range(kills):
                time.sleep(rng.uniform(*gap))
                marks.append([p.published for p in pub.all])
                broker.stop(kill=True)
                time.sleep(rng.uniform(0.0, 0.2))
                broker.start()
            time.sleep(rng.uniform(*gap))
            pub.halt()
            pub.drain(4 * settle_s)
            out.seconds = time.monotonic() - t0
            _settle(sub, pub.acked, settle_s)
            out.retained_survived = _retained_present(broker.port)
            acked = pub.acked
            lost = sorted(acked - sub.received)
            out.published, out.acked = pub.published, len(acked)
            out.delivered_acked = len(acked & sub.received)
            out.lost, out.lost_sample = len(lost), lost[:50]
            out.lost_per_kill = _per_kill(lost, [*marks, [p.published for p in pub.all]])
            out.unacked_at_end = pub.sweep()
            out.subscriber_sessions_lost, out.subscriber_connects = sub.sessions_lost, sub.connects
            out.duplicates = sub.messages - len(sub.received)
            out.acked_per_s = round(out.acked / out.seconds, 1)
            pub.stop()
            sub.stop()
        finally:
            broker.stop()
    return out


def _per_kill(lost: list[int], marks: list[list[int]]) -> list[int]:
    """Losses attributed to the kill that followed their publishing (the last entry: after the last kill)."""
    out = [0] * len(marks)
    for s in lost:
        i, n = s >> 40, s & ((1 << 40) - 1)
        out[next((k for k, m in enumerate(marks) if n < m[i]), len(marks) - 1)] += 1
    return out


def _settle(sub: Subscriber, acked: set[int], quiet_s: float) -> None:
    """Wait until every acked record arrived, or nothing new arrived for ``quiet_s``."""
    last, since = -1, time.monotonic()
    while not acked <= sub.received:
        n = sub.messages
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since > quiet_s:
            return
        time.sleep(0.05)


def _retained_present(port: int, timeout: float = 5.0) -> bool:
    got = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"rel-chk-{uuid.uuid4().hex[:8]}")
    c.on_connect = lambda cl, *a: cl.subscribe(f"{RETAINED}/#", qos=1)
    c.on_message = lambda _c, _u, m: got.set() if m.retain else None
    c.connect("127.0.0.1", port)
    c.loop_start()
    ok = got.wait(timeout)
    c.disconnect()
    c.loop_stop()
    return ok


def rate_run(profile: Profile, seconds: float, retained_bytes: int, publishers: int = 1) -> dict[str, Any]:
    """Acknowledged records per second with no kills, and the database size a save writes."""
    with tempfile.TemporaryDirectory(prefix="megace-rate-") as tmp, profile.broker(Path(tmp), free_port()) as broker:
        plant_retained(broker.port, retained_bytes)
        sub = Subscriber(broker.port).start()
        pub = Publishers(broker.port, publishers)
        t0 = time.monotonic()
        pub.go()
        time.sleep(seconds)
        pub.halt()
        pub.sweep()
        elapsed = time.monotonic() - t0
        acked = len(pub.acked)
        pub.drain(10)
        _settle(sub, pub.acked, 5)
        pub.stop()
        sub.stop()
        db = broker.db_path.stat().st_size if broker.db_path.exists() else 0
        return {"profile": profile.name, "retained_bytes": retained_bytes, "publishers": publishers,
                "acked_per_s": round(acked / elapsed, 1),
                "delivered": len(sub.received), "db_bytes_at_end": db, "loadavg_1min": round(os.getloadavg()[0], 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=10, help="SIGKILLs per profile")
    ap.add_argument("--profiles", default=",".join(PROFILES), help="comma-separated: " + ", ".join(PROFILES))
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rate-seconds", type=float, default=5.0, help="length of each throughput run (0: none)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved throughput repeats per profile")
    ap.add_argument("--retained-bytes", default="0,2097152", help="retained state sizes for the throughput runs")
    ap.add_argument("--publishers", default="1,8", help="publisher counts for the throughput runs")
    ap.add_argument("--kill-publishers", type=int, default=4, help="publishers during the kill runs")
    ap.add_argument("--out", default="bench/results/durability.json")
    a = ap.parse_args(argv)
    profiles = [PROFILES[p] for p in a.profiles.split(",")]
    doc: dict[str, Any] = {
        "bench": "durability", "command": "python -m tests.reliability.broker_kill " + " ".join(sys.argv[1:]),
        "machine": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()], "payload_bytes": PAYLOAD_BYTES,
        "profiles": {p.name: asdict(p) for p in profiles}, "kills": [], "throughput": [],
    }
    for i, p in enumerate(profiles):
        r = kill_run(p, a.kills, seed=a.seed + i, publishers=a.kill_publishers)
        doc["kills"].append(asdict(r))
        print(f"{p.name}: {r.kills} kills, {r.acked} acked, lost {r.lost} {r.lost_per_kill}, "
              f"sessions lost {r.subscriber_sessions_lost}, retained survived {r.retained_survived}", flush=True)
    cases = [(int(s), int(n)) for s in a.retained_bytes.split(",") for n in a.publishers.split(",")]
    for size, npub in cases if a.rate_seconds > 0 else []:
        for rep in range(a.repeats):
            for p in profiles if rep % 2 == 0 else profiles[::-1]:  # interleaved: shared, noisy machine
                r2 = rate_run(p, a.rate_seconds, size, npub)
                doc["throughput"].append(r2)
                print(f"rate {p.name} retained={size} publishers={npub}: {r2['acked_per_s']}/s "
                      f"db={r2['db_bytes_at_end']}", flush=True)
    doc["throughput_median"] = _medians(doc["throughput"])
    doc["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


def _medians(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keys = sorted({(r["profile"], r["retained_bytes"], r["publishers"]) for r in rows})
    out = []
    for prof, size, npub in keys:
        xs = sorted(r["acked_per_s"] for r in rows
                    if (r["profile"], r["retained_bytes"], r["publishers"]) == (prof, size, npub))
        out.append({"profile": prof, "retained_bytes": size, "publishers": npub,
                    "acked_per_s_median": xs[len(xs) // 2], "acked_per_s_all": xs})
    return out


if __name__ == "__main__":
    sys.exit(main())
