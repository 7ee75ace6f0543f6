"""Messages per second through one broker node, per broker, for ``docs/SCALING.md``.

Each broker is started privately on loopback (Mosquitto, a NATS node, a node pair of a three-node NATS
cluster, RabbitMQ's MQTT plugin), and ``--publishers`` paho clients publish ``--messages`` each (QoS 1,
``--payload`` bytes, megace-shaped topics ``megace/v1/site/s<i>/device/d<j>/up/features``) while one
subscriber on ``megace/v1/site/+/device/+/up/features`` counts what arrives. Reported per broker: the rate
at which PUBACKs came back (what a device sees), the rate at which the subscriber received (what an edge
sees), and what was lost. The brokers are measured one after another, then again in reverse order, so
that load on a shared machine falls on all alike; the best of the two counts.

    python bench/bench_scaling.py [--messages 5000] [--publishers 4] [--payload 1024] [--brokers mosquitto,nats,...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from broker.runners import MosquittoBroker, NatsBroker, NatsCluster, RabbitMQBroker

OUT = Path(__file__).resolve().parent / "results" / "scaling.json"
FILTER = "megace/v1/site/+/device/+/up/features"


@contextlib.contextmanager
def broker(kind: str) -> Iterator[tuple[tuple[str, int], tuple[str, int], str]]:
    """``kind``'s broker: (publishers' address, subscriber's address, what it is)."""
    if kind == "mosquitto":
        with MosquittoBroker(persistence=False) as b:
            yield (b.host, b.port), (b.host, b.port), "mosquitto 2.0.11, one node, no persistence"
    elif kind == "mosquitto-durable":
        with MosquittoBroker(autosave_on_changes=True, autosave_interval=1) as b:
            yield (b.host, b.port), (b.host, b.port), "mosquitto 2.0.11, one node, a save per change (durability.conf)"
    elif kind == "nats":
        with NatsBroker() as b:
            yield (b.host, b.port), (b.host, b.port), "nats-server 2.9.10, one node, JetStream + MQTT"
    elif kind == "nats-cluster":
        with NatsCluster(3) as c:
            yield c.addresses[0], c.addresses[1], "nats-server 2.9.10, 3 nodes; publish on node 0, subscribe on node 1"
    elif kind == "rabbitmq":
        with RabbitMQBroker() as b:
            yield (b.host, b.port), (b.host, b.port), "rabbitmq 3.10 MQTT plugin, one node"
    else:
        raise ValueError(f"unknown broker {kind!r}")


def client(cid: str) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv311, clean_session=True)
    c.max_inflight_messages_set(100)
    return c


def measure(pub_at: tuple[str, int], sub_at: tuple[str, int], *, messages: int, publishers: int,
            payload: int, timeout: float = 300.0) -> dict[str, Any]:
    """One run: ``publishers`` x ``messages`` QoS 1 publishes, one wildcard subscriber at QoS 1."""
    got = [0]
    done = threading.Event()
    total = messages * publishers
    subscribed = threading.Event()

    def on_message(_c: mqtt.Client, _u: Any, _m: mqtt.MQTTMessage) -> None:
        got[0] += 1
        if got[0] >= total:
            done.set()

    sub = client(f"scale-sub-{uuid.uuid4().hex[:6]}")
    sub.on_connect = lambda c, *a: c.subscribe(FILTER, 1)
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.on_message = on_message
    sub.connect(*sub_at)
    sub.loop_start()
    if not subscribed.wait(60):
        raise TimeoutError("subscriber never subscribed")
    time.sleep(0.5)  # a cluster: let the subscription's interest reach the other nodes
    body = os.urandom(payload)
    pubs = []
    for p in range(publishers):
        c = client(f"scale-pub-{p}-{uuid.uuid4().hex[:6]}")
        c.connect(*pub_at)
        c.loop_start()
        pubs.append(c)
    acked_at: list[float] = []

    def run(p: int, c: mqtt.Client) -> None:
        infos = [c.publish(f"megace/v1/site/s{p}/device/d{i % 50}/up/features", body, qos=1) for i in range(messages)]
        for info in infos:
            info.wait_for_publish(timeout)
        acked_at.append(time.monotonic())

    t0 = time.monotonic()
    threads = [threading.Thread(target=run, args=(p, c)) for p, c in enumerate(pubs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    acked_s = max(acked_at, default=time.monotonic()) - t0
    done.wait(max(5.0, timeout - (time.monotonic() - t0)))
    received_s = time.monotonic() - t0
    for c in [*pubs, sub]:
        c.disconnect()
        c.loop_stop()
    return {"messages": total, "acked_per_s": round(total / acked_s), "received": got[0],
            "received_per_s": round(got[0] / received_s), "lost": total - got[0],
            "seconds": round(received_s, 2)}


def bench(kinds: list[str], *, messages: int, publishers: int, payload: int,
          log: Callable[[str], None] = print) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    what: dict[str, str] = {}
    for order in (kinds, list(reversed(kinds))):
        for kind in order:
            load = round(os.getloadavg()[0], 2)
            with broker(kind) as (pub_at, sub_at, desc):
                what[kind] = desc
                r = measure(pub_at, sub_at, messages=messages, publishers=publishers, payload=payload)
            r["loadavg_1min"] = load
            runs[kind].append(r)
            log(f"{kind}: {r}")
    best = {k: max(v, key=lambda r: r["received_per_s"]) for k, v in runs.items()}
    return {"brokers": {k: {"what": what[k], "best": best[k], "runs": runs[k]} for k in kinds}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=5000, help="per publisher")
    ap.add_argument("--publishers", type=int, default=4)
    ap.add_argument("--payload", type=int, default=1024)
    ap.add_argument("--brokers", default="mosquitto,mosquitto-durable,nats,nats-cluster,rabbitmq")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    doc: dict[str, Any] = {
        "bench": "scaling",
        "command": "python bench/bench_scaling.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
        "note": "publishers, subscriber and broker(s) share this machine's cores with other work: a floor, not a "
                "broker's capacity on its own hardware",
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "settings": {"messages_per_publisher": a.messages, "publishers": a.publishers, "payload_bytes": a.payload,
                     "qos": 1, "client": "paho 2 (MQTT 3.1.1), in-flight window 100"},
    }
    doc |= bench(a.brokers.split(","), messages=a.messages, publishers=a.publishers, payload=a.payload)
    doc["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
