"""On-device ONNX prediction vs the round trip to the edge, the SDK's memory with a model, and the download size.

One run, one Mosquitto this script starts, one real edge agent (tiny backbone, toy task) on its own loop:

(a) download: the edge's model, exported with ``megace_model.onnx.build_artifact`` from the agent's own
    trainer, is pushed the way the service does it (``downlinks.emit(push_model(core, artifact))`` on the
    agent's loop, signed with the edge's key, chunked to ``limits.max_packet``) to a real ``DeviceClient`` with
    ``model_dir``; bytes on the wire per device (chunk envelopes included), chunks, and time to installed.
(b) latency: per sample, sequentially, after a warm-up: ``DeviceClient.predict`` with the model installed
    (onnxruntime on the device, no bus) vs ``request_inference`` to the agent until its ``Prediction`` arrives
    (the existing path); and the largest difference between the two answers' probabilities.
(c) memory: a fresh Python process that imports only the SDK (no torch) builds a ``DeviceClient`` with the
    stored model, connects, predicts 200 times: RSS (and private memory, from ``smaps_rollup``) after numpy,
    after the SDK, after ``import onnxruntime``, after loading the model, after predicting, and the peak
    (``VmHWM``). Goal: < 80 MB.

    python bench/bench_device_model.py [--requests 300] [--out bench/results/device_model.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.edge_harness import AgentThread, Answers, config_for, quantile  # noqa: E402
from broker.address import BrokerAddress  # noqa: E402
from broker.runners import MosquittoBroker  # noqa: E402
from broker.signing import generate_private_key, private_pem, public_pem  # noqa: E402
from broker.wire import FeatureRecord, Prediction  # noqa: E402
from edge_agent.model_push import push_model, wire_bytes  # noqa: E402
from edge_agent.training.toy_task import ToyTask  # noqa: E402
from megace_model.onnx import build_artifact  # noqa: E402

DEVICE_PROCESS = r"""
import json, os, sys, time
def rss():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    out = {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}
    roll = dict(line.split(":", 1) for line in list(open("/proc/self/smaps_rollup"))[1:])
    out["Private"] = (int(roll["Private_Clean"].split()[0]) + int(roll["Private_Dirty"].split()[0])) / 1024
    return out
out = {"start": rss()}
import numpy as np
out["after_numpy"] = rss()
import device_sdk
from device_sdk import DeviceClient, FeatureRecord
out["after_import"] = rss()
addr, model_dir, store, samples = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
import onnxruntime
out["after_onnxruntime_import"] = rss()
dev = DeviceClient("bench", "dev-rss", addr, model_dir=model_dir, store_path=store)
assert dev.model is not None and dev.model.version is not None, "no model loaded"
out["after_model_load"] = rss()
assert dev.connect(10), "not connected"
records = [FeatureRecord("dev-rss", i, {m: np.asarray(v, np.float32) for m, v in s.items()})
           for i, s in enumerate(samples)]
lat = []
for i in range(200):
    t0 = time.perf_counter()
    p = dev.predict(records[i % len(records)])
    lat.append((time.perf_counter() - t0) * 1000)
    assert not isinstance(p, int), "fell back to the edge"
out["after_predict"] = rss()
out["latency_ms"] = sorted(lat)
out["heavy_modules"] = sorted(m for m in ("torch", "transformers", "peft", "onnx", "aiomqtt") if m in sys.modules)
out["onnxruntime_loaded"] = "onnxruntime" in sys.modules
dev.close(2)
print(json.dumps(out))
"""


def bench(addr: BrokerAddress, tmp: Path, requests: int, warmup: int = 30) -> dict[str, Any]:
    key = generate_private_key()
    (tmp / "edge.key").write_bytes(private_pem(key))
    (tmp / "edge.pub").write_bytes(public_pem(key.public_key()))
    cfg = config_for(addr, tmp / "edge", "bench-model", persistent_session=False,
                     signing={"key_file": str(tmp / "edge.key")})
    runner = AgentThread(cfg).start()
    answers = Answers()
    dev = answers.device(addr, "dev-model", tmp / "dev.sqlite", model_dir=tmp / "models", edge_key=tmp / "edge.pub")
    try:
        task = ToyTask(cfg.model, seed=12)
        samples = task.samples(64)
        # (b, edge side first: no model on the device yet, so predict() asks the edge)
        edge_ms = []
        for i in range(requests + warmup):
            t0 = time.perf_counter()
            sent = dev.predict(FeatureRecord("dev-model", i, samples[i % len(samples)]["modalities"]))
            if not isinstance(sent, int):
                raise RuntimeError("predicted locally before any model was sent")
            arrived = answers.wait(i)[0]
            if i >= warmup:
                edge_ms.append((arrived - t0) * 1000)
        # (a) export from the agent's trainer, push as the service would, on the agent's loop
        t_export = time.perf_counter()
        art = build_artifact(runner.agent.trainer.model, cfg.model, samples[:8], version=1)
        export_s = time.perf_counter() - t_export
        sent_bytes: list[int] = []

        async def push() -> None:
            out = push_model(runner.agent.core, art)
            sent_bytes.append(wire_bytes(out))
            sent_bytes.append(len(out))
            runner.agent.downlinks.emit(out)

        t_push = time.perf_counter()
        asyncio.run_coroutine_threadsafe(push(), runner.loop).result(30)
        while dev.model is None or dev.model.version != 1:
            if time.perf_counter() - t_push > 60:
                raise RuntimeError(f"model not installed in 60 s: {dev.counters.snapshot()}")
            time.sleep(0.005)
        install_s = time.perf_counter() - t_push
        # (b, device side)
        local_ms, diffs = [], []
        for i in range(requests + warmup):
            rec = FeatureRecord("dev-model", i, samples[i % len(samples)]["modalities"])
            t0 = time.perf_counter()
            pred = dev.predict(rec)
            dt = (time.perf_counter() - t0) * 1000
            if not isinstance(pred, Prediction):
                raise RuntimeError("fell back to the edge with a model installed")
            if i >= warmup:
                local_ms.append(dt)
            diffs.append(float(np.abs(pred.probs - answers.got[i][1]).max()))
        counters = dev.counters.snapshot()
    finally:
        dev.close(5)
        runner.close()
    shutil.copytree(tmp / "models", tmp / "models-rss")
    rss = device_rss(addr, tmp / "models-rss", tmp / "rss.sqlite", [s["modalities"] for s in samples[:16]])
    e50, e99, l50, l99 = (statistics.median(edge_ms), quantile(edge_ms, 0.99), statistics.median(local_ms),
                          quantile(local_ms, 0.99))
    peak = rss["after_predict"]["VmHWM"]
    device_lat = rss.pop("latency_ms")
    return {
        "model": {"backbone": cfg.model.backbone, "modalities": {m: [s.max_tokens, s.token_dim] for m, s in
                                                                 cfg.model.modalities.items()},
                  "classes": cfg.model.num_classes, "onnx_bytes": len(art.data), "parity_vs_torch": art.parity,
                  "export_s": round(export_s, 3)},
        "download": {"wire_bytes_per_device": sent_bytes[0], "messages": sent_bytes[1],
                     "overhead_bytes": sent_bytes[0] - len(art.data), "max_packet": cfg.limits.max_packet,
                     "signed": True, "push_to_installed_s": round(install_s, 3)},
        "latency": {"requests": requests, "warmup": warmup,
                    "local_p50_ms": round(l50, 4), "local_p99_ms": round(l99, 4),
                    "edge_round_trip_p50_ms": round(e50, 3), "edge_round_trip_p99_ms": round(e99, 3),
                    "speedup_p50": round(e50 / l50, 1),
                    "max_abs_prob_diff_local_vs_edge": max(diffs),
                    "note": "local: DeviceClient.predict in this process (numpy + onnxruntime, 1 thread); edge: "
                            "request_inference until the Prediction callback, agent's torch predictor"},
        "device_process": {**rss, "predict_p50_ms": round(statistics.median(device_lat), 4),
                           "predict_p99_ms": round(quantile(device_lat, 0.99), 4)},
        "rss_goal_mb": 80, "rss_peak_mb": round(peak, 1), "met": peak < 80,
        "device_counters": {k: v for k, v in counters.items() if k.startswith(("predict", "model", "rejected",
                                                                              "received.model"))},
    }


def device_rss(addr: BrokerAddress, model_dir: Path, store: Path, samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The SDK alone in a fresh interpreter (no torch): RSS with onnxruntime and the model loaded."""
    arg = json.dumps([{m: np.asarray(v).tolist() for m, v in s.items()} for s in samples])
    out = subprocess.run([sys.executable, "-c", DEVICE_PROCESS, addr.url(), str(model_dir), str(store), arg],
                         capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode != 0:
        raise RuntimeError(f"device process failed: {out.stderr[-2000:]}")
    got = json.loads(out.stdout.strip().splitlines()[-1])
    if got["heavy_modules"]:
        raise RuntimeError(f"the device process loaded {got['heavy_modules']}")
    return got


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "device_model.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    import onnxruntime

    result: dict[str, Any] = {
        "bench": "device_model",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "onnxruntime": onnxruntime.__version__, "cpus": os.cpu_count(),
                    "broker": "mosquitto (private, loopback)",
                    "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
                    "note": "2 cores shared with other workers; figures from one run, noisy"},
    }
    with tempfile.TemporaryDirectory(prefix="megace-bench-devmodel-") as tmp_name, MosquittoBroker() as broker:
        result.update(bench(BrokerAddress(broker.host, broker.port), Path(tmp_name), args.requests))
    result["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    lat, dl, dp = result["latency"], result["download"], result["device_process"]
    print(f"on-device predict p50 / p99 (ms)      {lat['local_p50_ms']} / {lat['local_p99_ms']}")
    print(f"edge round trip p50 / p99 (ms)        {lat['edge_round_trip_p50_ms']} / {lat['edge_round_trip_p99_ms']}"
          f"  (x{lat['speedup_p50']} at p50)")
    print(f"download per device (bytes, messages) {dl['wire_bytes_per_device']}, {dl['messages']} "
          f"(model {result['model']['onnx_bytes']})")
    print(f"SDK process RSS after import / model / predict, peak (MB)  {dp['after_import']['VmRSS']:.1f} / "
          f"{dp['after_model_load']['VmRSS']:.1f} / {dp['after_predict']['VmRSS']:.1f}, {result['rss_peak_mb']}"
          f"  goal < 80: {result['met']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
