"""Device SDK benchmark: SDK vs raw paho publish rate, codec throughput, import cost.

All figures are measured side by side in one run against one private Mosquitto,
because these machines are shared and noisy: compare the ratios, not absolute times.
Both publishers use the same client settings (MQTT 3.1.1, persistent session, last will,
TCP_NODELAY, 100 in flight, QoS 1) and send the same bytes: the raw side publishes the
SDK's own envelopes, encoded beforehand, so the ratio is the SDK's per-record cost
(encoding, bookkeeping, back-pressure). Every side waits for every PUBACK and fails if one
is missing.

The single-record ratio is the median of ``--pairs`` interleaved pairs after a warm-up; which
side goes first alternates, and each pair records the 1-minute load average and the process CPU
time per message of each side (all threads of this process; the broker is a separate process).

    python bench/bench_sdk.py [--messages 40000] [--pairs 12] [--repeats 3] [--out bench/results/sdk.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker import topics
from broker.address import BrokerAddress
from broker.runners import MosquittoBroker
from broker.wire import (
    FeatureRecord,
    Kind,
    Status,
    decode_array,
    decode_envelope,
    encode_array,
    encode_envelope,
)
from device_sdk import DeviceClient

INFLIGHT = 100
FLOATS = 218  # makes the SDK's envelope about 1 KiB
SITE = "bench"


def records(device: str, n: int) -> list[FeatureRecord]:
    arr = np.random.default_rng(0).random(FLOATS, dtype=np.float32)
    return [FeatureRecord(device, i, {"accel": arr}) for i in range(n)]


class Run:
    """One timed side of a pair: messages per second and this process's CPU time per message."""

    def __init__(self, n: int, seconds: float, cpu_s: float) -> None:
        self.rate = n / seconds
        self.cpu_us_per_msg = cpu_s / n * 1e6


def raw_paho_rate(addr: BrokerAddress, payloads: list[bytes]) -> Run:
    """Pre-encoded payloads through a bare paho client at QoS 1, until every PUBACK is in.

    The client is set up like the SDK's (see ``DeviceClient._new_client`` and ``_on_connect``). Every message goes
    into paho at once: the cheapest way to drive paho (no back-pressure wait), so the strictest baseline. Paho's
    queue is an ``OrderedDict``, so its per-PUBACK scan does not grow with the queue (measured: no difference from
    a publisher that keeps at most the SDK's ``max_unacked`` of 2,000 unacknowledged).
    """
    n = len(payloads)
    done = threading.Event()
    connected = threading.Event()
    acked = [0]

    def on_connect(client: mqtt.Client, *_: object) -> None:
        sock = client.socket()
        if isinstance(sock, socket.socket):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as the SDK does
        connected.set()

    def on_publish(*_: object) -> None:
        acked[0] += 1
        if acked[0] == n:
            done.set()

    device = "raw"
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"megace-dev-{device}", protocol=mqtt.MQTTv311,
                    clean_session=False)
    c.will_set(topics.status(topics.Role.DEVICE, device),
               Status(role="device", id=device, state="offline", detail={"site": SITE}).encode(), qos=1, retain=True)
    c.max_inflight_messages_set(INFLIGHT)
    c.on_connect = on_connect
    c.on_publish = on_publish
    c.connect(addr.host, addr.port)
    c.loop_start()
    try:
        if not connected.wait(10):
            raise RuntimeError("raw paho: no CONNACK in 10 s")
        topic = topics.device_up(SITE, device, topics.Uplink.FEATURES)
        c0, t0 = time.process_time(), time.perf_counter()
        infos = [c.publish(topic, p, qos=1) for p in payloads]
        if not done.wait(300):
            raise RuntimeError(f"raw paho: {acked[0]} of {n} PUBACKs after 300 s")
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        if not all(i.is_published() for i in infos):
            raise RuntimeError("raw paho: a message without its PUBACK")
    finally:
        c.disconnect()
        c.loop_stop()
    return Run(n, dt, cpu)


def _timed_publish(dev: DeviceClient, recs: list[FeatureRecord], what: str) -> tuple[float, float]:
    """Connect, publish every record, wait until the broker acknowledged all: the seconds and CPU seconds."""
    if not dev.connect(10):
        raise RuntimeError(f"{what}: not connected in 10 s")
    c0, t0 = time.process_time(), time.perf_counter()
    for r in recs:
        dev.publish(r)
    if not dev.flush(300):
        raise RuntimeError(f"{what}: {dev.pending} messages not acknowledged after 300 s")
    return time.perf_counter() - t0, time.process_time() - c0


def sdk_rate(addr: BrokerAddress, recs: list[FeatureRecord], store: Path, last_payload: bytes) -> Run:
    """Feature records (encoded by the SDK on each call) through DeviceClient at QoS 1, until all are acked.

    Fails unless the SDK did the raw side's work: every record went straight out (none via the disk queue, no
    reconnect), under seqs 0..n-1 as the raw side's envelopes (so of the same sizes), all acknowledged."""
    n = len(recs)
    dev = DeviceClient(SITE, "sdk", addr, store_path=store, max_inflight=INFLIGHT)
    try:
        first = dev._seq
        dt, cpu = _timed_publish(dev, recs, "SDK")
        sent, acked = dev.counters["sent.features"], dev.counters["acked"]
        if sent != n or acked < n:  # acked also counts the registration-free status messages, if any
            raise RuntimeError(f"SDK: {sent} records sent, {acked} acked, {n} published")
        if dev.counters["requeued"] or dev.counters["disconnects"] or dev.counters["connects"] != 1:
            raise RuntimeError(f"SDK: not one clean connection: {dev.counters.snapshot()}")
        if first != 0 or dev._seq != n:
            raise RuntimeError(f"SDK: seqs {first}..{dev._seq - 1}, the raw side sends 0..{n - 1}")
        last = encode_envelope(Kind.FEATURES, "sdk", n - 1, recs[-1].to_body())
        mine, theirs = decode_envelope(last), decode_envelope(last_payload)
        if len(last) != len(last_payload) or (mine.kind, mine.seq, mine.body) != (theirs.kind, theirs.seq, theirs.body):
            raise RuntimeError(f"SDK: a {len(last)}-byte last envelope unlike the raw side's ({len(last_payload)})")
    finally:
        dev.close(5)
    return Run(n, dt, cpu)


def sdk_batched_rate(addr: BrokerAddress, recs: list[FeatureRecord], store: Path, *, linger_ms: float,
                     batch_max: int) -> float:
    """The same records through ``DeviceClient.publish`` with lingering on (``features_batch`` messages, QoS 1),
    until every batch is acknowledged: records/s, to set against raw paho's single-record messages/s."""
    n = len(recs)
    dev = DeviceClient(SITE, "sdk-batched", addr, store_path=store, max_inflight=INFLIGHT, linger_ms=linger_ms,
                       batch_max=batch_max)
    try:
        dt, _ = _timed_publish(dev, recs, "SDK batched")
        if dev.counters["sent.batched_records"] != n:
            raise RuntimeError(f"SDK batched: {dev.counters['sent.batched_records']} of {n} records sent")
    finally:
        dev.close(5)
    return n / dt


def codec_rates(array: np.ndarray, seconds: float = 1.0) -> dict[str, float]:
    rec = FeatureRecord("d", 0, {"x": array})
    payload = encode_envelope(Kind.FEATURES, "d", 0, rec.to_body())

    def rate(fn) -> float:
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            fn()
            n += 1
        return n / (time.perf_counter() - t0)

    enc = rate(lambda: encode_envelope(Kind.FEATURES, "d", 0, FeatureRecord("d", 0, {"x": array}).to_body()))
    dec = rate(lambda: FeatureRecord.from_body(decode_envelope(payload).body))
    raw = array.tobytes()
    copy = rate(lambda: bytearray(raw))
    return {
        "payload_bytes": len(payload),
        "encode_per_s": enc,
        "decode_per_s": dec,
        "encode_MBps": enc * len(payload) / 1e6,
        "decode_MBps": dec * len(payload) / 1e6,
        "memcpy_MBps": copy * len(raw) / 1e6,
        "decode_vs_memcpy": dec / copy,
    }


_RSS = "int([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1]) / 1024"
_FIRST_PUBLISH = f"""
import sys, tempfile, time
t = time.perf_counter()
import device_sdk
dt = time.perf_counter() - t
rss_import, numpy_loaded = {_RSS}, int("numpy" in sys.modules)
from device_sdk import BrokerAddress, DeviceClient, FeatureRecord
host, port, kind = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if kind == "numpy":
    import numpy as np
    values = np.arange(218, dtype=np.float32)
else:  # a gateway's own buffer: no numpy anywhere
    import array
    values = array.array("f", range(218))
with tempfile.TemporaryDirectory() as tmp:
    dev = DeviceClient("bench", "rss-" + kind, BrokerAddress(host, port), store_path=tmp + "/q.sqlite")
    assert dev.connect(10)
    dev.publish(FeatureRecord("rss-" + kind, 0, {{"accel": values}}))
    assert dev.flush(10)
    rss_published = {_RSS}
    dev.close(5)
heavy = int(any(m in sys.modules for m in ("torch", "transformers", "onnxruntime")))
print(dt, rss_import, rss_published, numpy_loaded, int("numpy" in sys.modules), heavy)
"""
"""One fresh interpreter: import time and VmRSS after ``import device_sdk`` (from /proc, not ru_maxrss: a
child's ru_maxrss inherits the forking parent's peak), then VmRSS after connecting and the first publish of a
numpy record (``numpy``) or of an ``array.array`` record (``buffer``)."""


def import_cost(addr: BrokerAddress, runs: int = 5) -> dict[str, float]:
    out: dict[str, list[list[str]]] = {}
    for kind in ("numpy", "buffer"):
        out[kind] = [subprocess.run([sys.executable, "-c", _FIRST_PUBLISH, addr.host, str(addr.port), kind],
                                    capture_output=True, text=True, check=True).stdout.split() for _ in range(runs)]
    both = out["numpy"] + out["buffer"]
    return {
        "import_s_median": statistics.median(float(r[0]) for r in both),
        "rss_MB_median": statistics.median(float(r[1]) for r in both),
        "rss_after_first_numpy_publish_MB_median": statistics.median(float(r[2]) for r in out["numpy"]),
        "rss_after_first_buffer_publish_MB_median": statistics.median(float(r[2]) for r in out["buffer"]),
        "numpy_imported_by_import": max(int(r[3]) for r in both),
        "numpy_imported_by_buffer_publish": max(int(r[4]) for r in out["buffer"]),
        "heavy_modules_imported": max(int(r[5]) for r in both),
        "runs": len(both),
    }


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def publish_pairs(addr: BrokerAddress, recs: list[FeatureRecord], payloads: list[bytes], tmp: Path, pairs: int,
                  warmup: int) -> dict[str, Any]:
    """Single-record publish, SDK vs raw paho: a warm-up of each, then ``pairs`` pairs, alternating which side
    goes first (a side that always went second would always meet the other's leftovers: broker, caches, load)."""
    raw_paho_rate(addr, payloads[:warmup])
    sdk_rate(addr, recs[:warmup], tmp / "warmup.sqlite", payloads[warmup - 1])
    raw: list[Run] = []
    sdk: list[Run] = []
    load, order = [], []
    for i in range(pairs):
        load.append(loadavg()[0])
        first = "raw" if i % 2 == 0 else "sdk"
        order.append(first)
        if first == "raw":
            raw.append(raw_paho_rate(addr, payloads))
        sdk.append(sdk_rate(addr, recs, tmp / f"q{i}.sqlite", payloads[-1]))
        if first == "sdk":
            raw.append(raw_paho_rate(addr, payloads))
        print(f"pair {i + 1}/{pairs} ({first} first, load {load[-1]:.2f}): raw {raw[-1].rate:,.0f}/s, "
              f"SDK {sdk[-1].rate:,.0f}/s, ratio {sdk[-1].rate / raw[-1].rate:.3f}", flush=True)
    ratios = [s.rate / r.rate for s, r in zip(sdk, raw, strict=True)]
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    ratio = statistics.median(ratios)
    return {
        "raw_paho_msgs_per_s": [r.rate for r in raw], "sdk_records_per_s": [s.rate for s in sdk],
        "loadavg_1min_per_pair": load, "first_per_pair": order, "pairs": pairs, "messages_per_side": len(recs),
        "warmup_messages": warmup,
        "raw_cpu_us_per_msg": [round(r.cpu_us_per_msg, 1) for r in raw],
        "sdk_cpu_us_per_msg": [round(s.cpu_us_per_msg, 1) for s in sdk],
        "cpu_ratio_median": statistics.median(s.cpu_us_per_msg / r.cpu_us_per_msg for s, r in zip(sdk, raw,
                                                                                                   strict=True)),
        "ratio_per_pair": ratios, "ratio_quartiles": [q[0], q[2]],
        "ratio_median": ratio, "goal_ratio": 0.9, "met": ratio >= 0.9,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--messages", type=int, default=40_000, help="messages per side of each single-record pair")
    ap.add_argument("--pairs", type=int, default=12, help="interleaved single-record pairs (SDK vs raw paho)")
    ap.add_argument("--warmup", type=int, default=2_000, help="messages of each side sent before the pairs")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved pairs of the batched arm")
    ap.add_argument("--out", default="bench/results/sdk.json")
    ap.add_argument("--batched-records", type=int, default=200_000)
    ap.add_argument("--linger-ms", type=float, default=5.0)
    ap.add_argument("--batch-max", type=int, default=512)
    ap.add_argument("--only-publish", action="store_true", help="the single-record pairs only; no JSON written")
    a = ap.parse_args()
    if a.messages < 2 or a.pairs < 1 or not 1 <= a.warmup <= a.messages:
        ap.error("need --messages >= 2, --pairs >= 1 and 1 <= --warmup <= --messages")

    recs = records("sdk", a.messages)
    # the raw side sends exactly the envelopes the SDK builds for the same records (seq = record number)
    payloads = [encode_envelope(Kind.FEATURES, "sdk", r.sample, r.to_body()) for r in recs]
    results: dict[str, Any] = {
        "bench": "sdk", "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
        "loadavg_at_start": loadavg(), "messages": a.messages,
        "payload_bytes": round(statistics.fmean(len(p) for p in payloads), 1), "inflight": INFLIGHT,
    }
    with MosquittoBroker(persistence=False) as broker, tempfile.TemporaryDirectory() as tmp:
        addr = BrokerAddress(broker.host, broker.port)
        pub = publish_pairs(addr, recs, payloads, Path(tmp), a.pairs, a.warmup)
        if a.only_publish:
            print(json.dumps(pub, indent=2))
            return
        brecs = records("sdk-batched", a.batched_records)
        braw, bsdk = [], []
        for r in range(a.repeats):  # raw single-record messages/s again, interleaved with the batched arm
            braw.append(raw_paho_rate(addr, payloads).rate)
            bsdk.append(sdk_batched_rate(addr, brecs, Path(tmp) / f"b{r}.sqlite", linger_ms=a.linger_ms,
                                         batch_max=a.batch_max))
        bratio = statistics.median(s / r for s, r in zip(bsdk, braw, strict=True))
        results["publish_batched"] = {
            "raw_paho_msgs_per_s": braw, "sdk_batched_records_per_s": bsdk, "records": a.batched_records,
            "linger_ms": a.linger_ms, "batch_max": a.batch_max,
            "ratio_per_pair": [s / r for s, r in zip(bsdk, braw, strict=True)],
            "ratio_median": bratio, "goal_ratio": 5.0, "met": bratio >= 5.0,
        }
        results["publish"] = pub
    results["codec_384_floats"] = codec_rates(np.random.default_rng(1).random(384, dtype=np.float32))
    results["codec_1MiB_array"] = codec_rates(np.random.default_rng(2).random(1 << 18, dtype=np.float32), 2.0)
    with MosquittoBroker(persistence=False) as broker:
        imp = import_cost(BrokerAddress(broker.host, broker.port))
    results["sdk_import"] = imp | {
        "goal_import_s": 0.3, "goal_rss_MB": 40,
        "met_import_s": imp["import_s_median"] < 0.3, "met_rss_MB": imp["rss_MB_median"] < 40,
        "met": imp["import_s_median"] < 0.3 and imp["rss_MB_median"] < 40 and not imp["heavy_modules_imported"],
    }
    arr = np.arange(10)
    assert np.array_equal(decode_array(encode_array(arr)), arr)
    results["loadavg_at_end"] = loadavg()

    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    p, c1, c2, imp = results["publish"], results["codec_384_floats"], results["codec_1MiB_array"], results["sdk_import"]
    print(f"{'measure':<44}{'value':>14}")
    print(f"{'raw paho QoS1 msgs/s (median)':<44}{statistics.median(p['raw_paho_msgs_per_s']):>14.0f}")
    print(f"{'SDK QoS1 records/s (median)':<44}{statistics.median(p['sdk_records_per_s']):>14.0f}")
    print(f"{'SDK / raw ratio (goal >= 0.9)':<44}{p['ratio_median']:>14.2f}  met: {p['met']}")
    print(f"{'  per pair':<44}{', '.join(f'{r:.2f}' for r in p['ratio_per_pair'])}")
    print(f"{'SDK / raw CPU per message (median)':<44}{p['cpu_ratio_median']:>14.2f}")
    pb = results["publish_batched"]
    print(f"{'SDK batched records/s (median)':<44}{statistics.median(pb['sdk_batched_records_per_s']):>14.0f}")
    print(f"{'batched / raw single ratio (goal >= 5)':<44}{pb['ratio_median']:>14.2f}  met: {pb['met']}")
    print(f"{'384-float record encode / decode per s':<44}{c1['encode_per_s']:>7.0f}/{c1['decode_per_s']:<7.0f}")
    print(f"{'1 MiB array decode MB/s (memcpy MB/s)':<44}{c2['decode_MBps']:>7.0f}/{c2['memcpy_MBps']:<7.0f}")
    print(f"{'SDK import s / RSS MB (goals 0.3 / 40)':<44}"
          f"{imp['import_s_median']:>7.3f}/{imp['rss_MB_median']:<7.1f}  met: {imp['met']}")
    print(f"{'RSS MB after first publish: numpy / buffer':<44}{imp['rss_after_first_numpy_publish_MB_median']:>7.1f}/"
          f"{imp['rss_after_first_buffer_publish_MB_median']:<7.1f}  numpy loaded by import: "
          f"{bool(imp['numpy_imported_by_import'])}")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
