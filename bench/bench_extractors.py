"""Device feature extractors: latency per record and the memory of a torch-free process that runs them.

Builds the bundle (``megace extractors build``, timed), then measures in a child process where torch,
transformers and megace cannot be imported, as on a gateway: resident memory after ``import device_sdk``,
after opening the extractors, and after running them; and per-record latency (one onnxruntime thread) of
the MiniLM text encoder (a short sentence, a 250-word-piece text pooled into chunks, a batch of 32
sentences) and of the IMU front ends (100 samples x 6 channels). The machine is shared: read the ratios.

    python bench/bench_extractors.py [--repeats 200] [--bundle DIR] [--out bench/results/extractors.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, statistics, sys, time
for blocked in ("torch", "transformers", "megace", "megace_model", "sentence_transformers"):
    sys.modules[blocked] = None

def rss_mb():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}

memory = {"python": rss_mb()}
import numpy as np
import device_sdk
memory["import_device_sdk"] = rss_mb()
from device_sdk.extractors import ImuFrontEnd, TextEncoder
bundle, repeats = sys.argv[1], int(sys.argv[2])
t = time.perf_counter()
text = TextEncoder.open(bundle)
chunks = text.with_pooling("chunks")  # one onnxruntime session for both
imu, stats = ImuFrontEnd.open(bundle), ImuFrontEnd.open(bundle, "imu-stats")
open_s = time.perf_counter() - t
memory["extractors_open"] = rss_mb()

def timed(fn, n):
    fn()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(1000 * (time.perf_counter() - t))
    out.sort()
    return {"p50_ms": round(out[len(out) // 2], 3), "p95_ms": round(out[int(len(out) * 0.95)], 3), "n": n}

sentence = "the pump in the basement started rattling after the storm last night"
long_text = " ".join(["a long maintenance report about the machine room temperature rising slowly"] * 20)
batch = [f"{sentence} ({i})" for i in range(32)]
raw = np.random.default_rng(0).normal(size=(100, 6))
latency = {
    "text_sentence_tokens": timed(lambda: text.encode(sentence), repeats),
    "text_long_chunks_256": timed(lambda: chunks.encode(long_text), max(10, repeats // 10)),
    "text_batch32_per_record": {k: (round(v / 32, 3) if k != "n" else v)
                                for k, v in timed(lambda: text.encode_batch(batch), max(5, repeats // 20)).items()},
    "imu_window": timed(lambda: imu(raw), repeats),
    "imu_stats": timed(lambda: stats(raw), repeats),
}
memory["after_running"] = rss_mb()
print(json.dumps({"open_s": round(open_s, 3), "memory_mb": memory, "latency": latency,
                  "shapes": {"text": list(text.encode(sentence).shape),
                             "text_long": list(chunks.encode(long_text).shape),
                             **{k: list(v.shape) for k, v in imu(raw).items()}},
                  "torch_loaded": [m for m, v in sys.modules.items() if m.split(".")[0] == "torch" and v is not None]}))
"""

IMU_ONLY = r"""
import json, sys
sys.modules["torch"] = None
import numpy as np
import device_sdk
from device_sdk.extractors import ImuFrontEnd
imu = ImuFrontEnd.open(sys.argv[1])
imu(np.zeros((100, 6)))
fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}))
"""


def _child(script: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=1200, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--bundle", type=Path, help="an existing bundle (default: build one, timed)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/extractors.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bundle, build_s = args.bundle, None
        if bundle is None:
            from megace.extractors import build_extractors

            t = time.perf_counter()
            bundle = build_extractors(Path(tmp) / "bundle")
            build_s = round(time.perf_counter() - t, 2)
        manifest = json.loads((bundle / "manifest.json").read_text())
        measured = _child(CHILD, str(bundle), str(args.repeats))
        measured["memory_mb"]["imu_only_process"] = _child(IMU_ONLY, str(bundle))
        result = {
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
            "command": " ".join(["python bench/bench_extractors.py", *sys.argv[1:]]),
            "build_s": build_s,
            "bundle_bytes": {name: f["bytes"] for name, f in manifest["files"].items()},
            **measured,
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
