"""Device SDK benchmark: SDK vs raw paho publish rate, codec throughput, import cost.

All figures are measured side by side in one run against one private Mosquitto,
because these machines are shared and noisy: compare the ratios, not absolute times.

    python bench/bench_sdk.py [--messages 20000] [--repeats 3] [--out bench/results/sdk.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt

from broker import topics
from broker.address import BrokerAddress
from broker.runners import MosquittoBroker
from broker.wire import FeatureRecord, Kind, decode_array, decode_envelope, encode_array, encode_envelope
from device_sdk import DeviceClient

INFLIGHT = 100


def raw_paho_rate(addr: BrokerAddress, payload: bytes, n: int) -> float:
    """Pre-encoded payloads through a bare paho client at QoS 1, until every PUBACK is in."""
    done = threading.Event()
    acked = [0]

    def on_publish(*_: object) -> None:
        acked[0] += 1
        if acked[0] == n:
            done.set()

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-raw", protocol=mqtt.MQTTv311)
    c.max_inflight_messages_set(INFLIGHT)
    c.on_publish = on_publish
    c.connect(addr.host, addr.port)
    c.loop_start()
    topic = topics.device_up("bench", "raw", topics.Uplink.FEATURES)
    t0 = time.perf_counter()
    for _ in range(n):
        c.publish(topic, payload, qos=1)
    done.wait(120)
    dt = time.perf_counter() - t0
    c.disconnect()
    c.loop_stop()
    return n / dt


def sdk_rate(addr: BrokerAddress, n: int, floats: int, store: Path) -> float:
    """Feature records (encoded by the SDK on each call) through DeviceClient at QoS 1."""
    dev = DeviceClient("bench", "sdk", addr, store_path=store, max_inflight=INFLIGHT)
    assert dev.connect(10)
    arr = np.random.default_rng(0).random(floats, dtype=np.float32)
    t0 = time.perf_counter()
    for i in range(n):
        dev.publish(FeatureRecord("sdk", i, {"accel": arr}))
    assert dev.flush(120)
    dt = time.perf_counter() - t0
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


def import_cost() -> dict[str, float]:
    # VmRSS from /proc, not ru_maxrss: a child's ru_maxrss inherits the forking parent's peak.
    code = ("import time; t=time.perf_counter(); import device_sdk; dt=time.perf_counter()-t; import sys; "
            "rss=[int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS')][0]/1024; "
            "print(dt, rss, int(any(m in sys.modules for m in ('torch','transformers','onnxruntime'))))")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
            for _ in range(5)]
    return {
        "import_s_median": statistics.median(float(r[0]) for r in runs),
        "rss_MB_median": statistics.median(float(r[1]) for r in runs),
        "heavy_modules_imported": max(int(r[2]) for r in runs),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/results/sdk.json")
    a = ap.parse_args()

    floats = 218  # makes the SDK's envelope about 1 KiB, like the raw payload
    probe = encode_envelope(Kind.FEATURES, "sdk", 0, FeatureRecord("sdk", 0, {"accel": np.zeros(floats, np.float32)})
                            .to_body())
    raw_payload = bytes(len(probe))
    results: dict[str, object] = {"machine": platform.platform(), "python": platform.python_version(),
                                  "messages": a.messages, "payload_bytes": len(probe), "inflight": INFLIGHT}
    with MosquittoBroker(persistence=False) as broker, tempfile.TemporaryDirectory() as tmp:
        addr = BrokerAddress(broker.host, broker.port)
        raw, sdk = [], []
        for r in range(a.repeats):  # interleaved, so both see the same machine load
            raw.append(raw_paho_rate(addr, raw_payload, a.messages))
            sdk.append(sdk_rate(addr, a.messages, floats, Path(tmp) / f"q{r}.sqlite"))
        results["publish"] = {
            "raw_paho_msgs_per_s": raw, "sdk_records_per_s": sdk,
            "ratio_median": statistics.median(s / r for s, r in zip(sdk, raw, strict=True)),
            "goal_ratio": 0.9,
        }
    results["codec_384_floats"] = codec_rates(np.random.default_rng(1).random(384, dtype=np.float32))
    results["codec_1MiB_array"] = codec_rates(np.random.default_rng(2).random(1 << 18, dtype=np.float32), 2.0)
    results["sdk_import"] = import_cost() | {"goal_import_s": 0.3, "goal_rss_MB": 40}
    arr = np.arange(10)
    assert np.array_equal(decode_array(encode_array(arr)), arr)

    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    p, c1, c2, imp = results["publish"], results["codec_384_floats"], results["codec_1MiB_array"], results["sdk_import"]
    print(f"{'measure':<44}{'value':>14}")
    print(f"{'raw paho QoS1 msgs/s (median)':<44}{statistics.median(p['raw_paho_msgs_per_s']):>14.0f}")
    print(f"{'SDK QoS1 records/s (median)':<44}{statistics.median(p['sdk_records_per_s']):>14.0f}")
    print(f"{'SDK / raw ratio (goal >= 0.9)':<44}{p['ratio_median']:>14.2f}")
    print(f"{'384-float record encode / decode per s':<44}{c1['encode_per_s']:>7.0f}/{c1['decode_per_s']:<7.0f}")
    print(f"{'1 MiB array decode MB/s (memcpy MB/s)':<44}{c2['decode_MBps']:>7.0f}/{c2['memcpy_MBps']:<7.0f}")
    print(f"{'SDK import s / RSS MB (goals 0.3 / 40)':<44}"
          f"{imp['import_s_median']:>7.3f}/{imp['rss_MB_median']:<7.1f}")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
