"""Aggregation round time, megace against Flower's deployment runtime, side by side on the same payload.

Issue 12's goal: megace's round overhead stays >= 50x faster than Flower's deployment runtime. Both sides
move the same adapter per edge (80,352 float32 values: MiniLM's shared LoRA at rank 8), train nothing,
and average with FedAvg over a buffer of exactly N edges; each N runs megace and then Flower in the same run.

* megace: a private Mosquitto on a free loopback port, the real cloud service as a process
  (``python -m cloud_aggregator --config FILE``, what systemd runs; MiniLM rank-8 model config, fedavg,
  ``buffer_k = N``), and N light simulated edges in this process, each its own MQTT connection (paho,
  TCP_NODELAY as megace's clients set it) holding the global it last received. Each round every edge's
  upload is built beforehand (the current global, perturbed, fp32, ``tests/support/cloud_bus.update_payload``);
  the round time runs from just before the first of the N uploads is published until the last edge has
  received and decoded the new global version.
* Flower: ``flower-superlink --insecure`` and N ``flower-supernode --insecure`` processes on free loopback
  ports, and ``flwr run bench/flower_app`` (``bench/flower_app/``: a ServerApp with FedAvg over exactly N
  nodes, min N, no evaluation; ClientApps whose train returns a random 80,352-float32 array). Flower runs
  in its own virtual environment, ``.bench-venvs/flower`` (created with the stdlib venv module and
  ``pip install flwr==1.42.0`` when missing, reused otherwise). A round is timed inside the ServerApp from
  FedAvg configuring it (the global going down) to the new global aggregated from all N replies; the
  wall time of the whole ``flwr run`` over its rounds is reported beside it.

Each side reports every round and the median; ``ratio_flower_over_megace`` is Flower's median over
megace's per N. Nothing is downloaded except by the set-up step (pip into the git-ignored venv).

    python bench/bench_flower.py [--sizes 3 10] [--rounds 10] [--flower-rounds 5] [--out bench/results/flower.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from broker import topics  # noqa: E402
from broker.address import BrokerAddress  # noqa: E402
from broker.inbox import Inbox  # noqa: E402
from broker.runners import MosquittoBroker  # noqa: E402
from broker.runners.ports import free_port  # noqa: E402
from broker.wire import GlobalAdapter  # noqa: E402
from broker.wire.bodies import decode_body  # noqa: E402
from cloud_aggregator.config import load_cloud_config, write_cloud_config  # noqa: E402
from device_sdk.link import set_nodelay  # noqa: E402
from tests.support.cloud_bus import perturbed, update_payload  # noqa: E402

FLWR_VERSION = "1.42.0"
FLOWER_VENV = ROOT / ".bench-venvs" / "flower"
FLOWER_APP = ROOT / "bench" / "flower_app"
PAYLOAD_FLOATS = 80_352  # MiniLM's shared LoRA adapter at rank 8
RANK = 8
MODALITIES = {"accel": {"token_dim": 30, "max_tokens": 10}, "gyro": {"token_dim": 30, "max_tokens": 10}}  # BasicMotions
GOAL = 50.0


def _wait(pred: Any, timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := pred()):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)
    return value


class LightEdge:
    """A simulated edge: one MQTT connection that publishes its uploads and notes when each global arrives."""

    def __init__(self, addr: BrokerAddress, site: str) -> None:
        self.site = site
        self.inbox = Inbox()
        self.arrived: dict[int, float] = {}  # global version -> perf_counter once received and decoded
        self.latest: GlobalAdapter | None = None
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-flower-{site}",
                                  protocol=mqtt.MQTTv311)
        self.client.on_connect = lambda c, *_: c.subscribe([(f, 1) for f in topics.subscriptions(topics.global_down())])
        self.client.on_message = self._on_message
        self.client.connect(addr.host, addr.port)
        set_nodelay(self.client)
        self.client.loop_start()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        got = self.inbox.accept(msg.topic, msg.payload)
        if got is None:
            return
        body = decode_body(got[1])
        now = time.perf_counter()
        if isinstance(body, GlobalAdapter):
            with self.lock:
                self.arrived.setdefault(body.version, now)
                if self.latest is None or body.version > self.latest.version:
                    self.latest = body

    def has(self, version: int) -> bool:
        with self.lock:
            return version in self.arrived

    def publish(self, payload: bytes) -> mqtt.MQTTMessageInfo:
        return self.client.publish(topics.adapter_up(self.site), payload, qos=1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def run_megace(n: int, rounds: int, tmp: Path) -> dict[str, Any]:
    """N light edges and the cloud service on a private Mosquitto; ``rounds`` timed FedAvg rounds."""
    model = {"backbone": "minilm", "modalities": MODALITIES, "num_classes": 4, "lora_r": RANK, "lora_alpha": 2 * RANK}
    with MosquittoBroker(persistence=False) as broker:
        addr = BrokerAddress(broker.host, broker.port)
        cfg = load_cloud_config(None, {
            "cloud_id": f"cloud-bench-{n}", "broker": f"mqtt://{addr.host}:{addr.port}",
            "state_dir": str(tmp / f"megace-{n}" / "state"), "model": model,
            "aggregation": {"strategy": "fedavg", "buffer_k": n},
        }, environ={})
        cfg_path = write_cloud_config(cfg, tmp / f"megace-{n}" / "cloud.toml")
        edges = [LightEdge(addr, f"s{i}") for i in range(n)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        with open(tmp / f"megace-{n}" / "cloud.log", "wb") as log:
            cloud = subprocess.Popen([sys.executable, "-m", "cloud_aggregator", "--config", str(cfg_path)],
                                     cwd=ROOT, stderr=log, env=env)
        times: list[float] = []
        publish_s: list[float] = []
        first_s: list[float] = []
        try:
            t_start = time.monotonic()
            _wait(lambda: all(e.has(0) for e in edges), 600, "version 0 at every edge", cloud)
            startup_s = time.monotonic() - t_start
            for r in range(1, rounds + 1):
                latest = edges[0].latest
                assert latest is not None
                version = latest.version
                floats = sum(int(t.size) for t in latest.tensors.values())
                assert floats == PAYLOAD_FLOATS, f"the MiniLM rank-{RANK} global holds {floats} floats"
                payloads = [update_payload(perturbed(latest.tensors, zlib.crc32(f"{e.site}/{r}".encode()), 0.002),
                                           site=e.site, seq=r, base_version=version, fingerprint=latest.base_model,
                                           rank=RANK, alpha=RANK, modalities={m: 32 for m in MODALITIES})
                            for e in edges]
                t0 = time.perf_counter()
                infos = [e.publish(p) for e, p in zip(edges, payloads, strict=True)]
                for info in infos:
                    info.wait_for_publish(30)
                t_pub = time.perf_counter()
                _wait(lambda v=version + 1: all(e.has(v) for e in edges), 120, f"megace round {r}", cloud)
                times.append(max(e.arrived[version + 1] for e in edges) - t0)
                publish_s.append(t_pub - t0)
                first_s.append(min(e.arrived[version + 1] for e in edges) - t0)
                time.sleep(0.2)  # let the cloud's metrics and feedback go out before the next round
            upload_bytes = len(payloads[0])
        finally:
            cloud.terminate()
            cloud.wait(60)
            for e in edges:
                e.close()
    return {"rounds_s": [round(t, 5) for t in times], "median_s": statistics.median(times),
            "publish_s": [round(t, 5) for t in publish_s], "first_edge_s": [round(t, 5) for t in first_s],
            "upload_message_bytes": upload_bytes,
            "payload_floats": PAYLOAD_FLOATS, "cloud_startup_s": round(startup_s, 2)}


def ensure_flower_venv() -> Path:
    """``.bench-venvs/flower`` with flwr installed (the benchmark's own set-up step; reused when present)."""
    flwr = FLOWER_VENV / "bin" / "flwr"
    if flwr.exists():
        out = subprocess.run([str(flwr), "--version"], capture_output=True, text=True, check=False).stdout
        if FLWR_VERSION in out:
            return FLOWER_VENV / "bin"
    if not (FLOWER_VENV / "bin" / "pip").exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(FLOWER_VENV)], check=True)
    subprocess.run([str(FLOWER_VENV / "bin" / "pip"), "install", "-q", f"flwr=={FLWR_VERSION}"], check=True)
    return FLOWER_VENV / "bin"


class FlowerProcs:
    """The SuperLink and SuperNodes, each in its own process group (their app processes die with them)."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with open(self.logdir / f"{name}.log", "wb") as log:
            p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.logdir,
                                 start_new_session=True)
        self.procs.append(p)
        return p

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def run_flower(n: int, rounds: int, bindir: Path, tmp: Path) -> dict[str, Any]:
    """SuperLink + N SuperNodes on loopback, then ``flwr run`` of the app; per-round times from the ServerApp."""
    work = tmp / f"flower-{n}"
    home = work / "flwr-home"
    home.mkdir(parents=True)
    link_port = free_port("127.0.0.1")
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n')
    timings = work / "timings.json"
    run_cfg = work / "run_config.toml"
    run_cfg.write_text(f'num-server-rounds = {rounds}\nnum-nodes = {n}\npayload-floats = {PAYLOAD_FLOATS}\n'
                       f'timings-file = "{timings}"\n')
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{bindir}:{os.environ.get('PATH', '')}"}
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONPATH", None)
    procs = FlowerProcs(work)
    try:
        t_start = time.monotonic()
        link = procs.start("superlink", [str(bindir / "flower-superlink"), "--insecure", "--host", "127.0.0.1",
                                         "--port", str(link_port), "--disable-runtime-dependency-installation"], env)
        _wait(lambda: _listening(link_port), 120, "the SuperLink", link)
        for i in range(n):
            procs.start(f"supernode-{i}", [str(bindir / "flower-supernode"), "--insecure", "--superlink",
                                           f"127.0.0.1:{link_port}", "--port", str(free_port("127.0.0.1")),
                                           "--node-config", f"partition-id={i}"], env)
        startup_s = time.monotonic() - t_start
        t0 = time.monotonic()
        with open(work / "flwr-run.log", "wb") as log:
            run = subprocess.run([str(bindir / "flwr"), "run", str(FLOWER_APP), "bench", "--stream",
                                  "--run-config", str(run_cfg)], stdout=log, stderr=subprocess.STDOUT, env=env,
                                 cwd=work, timeout=120 + 60 * rounds, check=False)
        wall_s = time.monotonic() - t0
    finally:
        procs.stop()
    if not timings.exists():
        tail = (work / "flwr-run.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"flwr run (exit {run.returncode}) wrote no round timings:\n{tail}")
    doc = json.loads(timings.read_text())
    times = [r["round_s"] for r in doc["rounds"]]
    bad = [r for r in doc["rounds"] if r["replies"] != n or r["aggregated_floats"] != PAYLOAD_FLOATS]
    if len(times) != rounds or bad:
        raise RuntimeError(f"Flower ran {len(times)} of {rounds} rounds; rounds short of replies: {bad}")
    return {"rounds_s": [round(t, 4) for t in times], "median_s": statistics.median(times),
            "flwr_run_wall_s": round(wall_s, 2), "flwr_run_wall_per_round_s": round(wall_s / rounds, 3),
            "flwr_run_exit_code": run.returncode, "startup_s": round(startup_s, 2), "payload_floats": PAYLOAD_FLOATS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[3, 10])
    ap.add_argument("--rounds", type=int, default=10, help="megace rounds per N")
    ap.add_argument("--flower-rounds", type=int, default=5, help="Flower rounds per N (seconds each)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "flower.json")
    args = ap.parse_args()
    load_at_start = os.getloadavg()
    bindir = ensure_flower_venv()
    results = []
    with tempfile.TemporaryDirectory(prefix="megace-bench-flower-") as tmp_name:
        tmp = Path(tmp_name)
        for n in args.sizes:
            (tmp / f"megace-{n}").mkdir()
            meg = {"loadavg_before": list(os.getloadavg()), **run_megace(n, args.rounds, tmp)}
            print(f"N={n:<3} megace median {meg['median_s'] * 1000:8.1f} ms  rounds {meg['rounds_s']}", flush=True)
            flo = {"loadavg_before": list(os.getloadavg()), **run_flower(n, args.flower_rounds, bindir, tmp)}
            ratio = flo["median_s"] / meg["median_s"]
            print(f"N={n:<3} Flower median {flo['median_s'] * 1000:8.1f} ms  rounds {flo['rounds_s']}  "
                  f"(flwr run {flo['flwr_run_wall_s']:.1f} s)  ratio {ratio:.1f}x", flush=True)
            results.append({"n": n, "megace": meg, "flower": flo, "ratio_flower_over_megace": round(ratio, 2),
                            "met": ratio >= GOAL})
    doc = {
        "bench": "flower",
        "command": shlex.join(["python", "bench/bench_flower.py", *sys.argv[1:]]),
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
                    "loadavg_at_start": list(load_at_start), "loadavg_at_end": list(os.getloadavg())},
        "flower": {"version": FLWR_VERSION, "runtime": "deployment (flower-superlink + flower-supernode, --insecure,"
                   " loopback), flwr run --stream", "app": "bench/flower_app", "strategy": "FedAvg, fraction_train 1,"
                   " min_train_nodes = min_available_nodes = N, no evaluation"},
        "megace": {"broker": "private Mosquitto (loopback)", "cloud": "python -m cloud_aggregator (fedavg,"
                   " buffer_k = N, MiniLM rank-8 model config)", "edges": "N light simulated edges, paho, one"
                   " connection each"},
        "payload": f"{PAYLOAD_FLOATS} float32 values per edge (MiniLM shared LoRA, rank 8), no training",
        "round_time": "megace: first upload published -> new global decoded at the last edge; Flower: FedAvg "
                      "configure_train (global down) -> new global aggregated from N replies, inside the ServerApp",
        "goal": ">= 50x",
        "results": results,
        "met": all(r["met"] for r in results),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
