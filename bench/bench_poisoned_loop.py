"""The closed loop with one poisoning edge among four, against the same loop without it.

Three honest edges run the usual `megace run` loop on a private Mosquitto; a fourth participant, on a
site of its own, answers every new global with a poisoned upload: the global's B factors flipped in
sign and amplified (``--flip``), claiming ``10**12`` samples, based on the version it just saw (so it is
never stale). The cloud's guards decide what it gets: the effective-update norm band, the sample clip
and the per-module share cap. Both arms run with the same seeds, one after the other, on the same
broker settings; the figure is the difference in final accuracy at the honest edges' devices.

    python bench/bench_poisoned_loop.py [--seeds 3] [--rounds 5] [--flip 3.0] [--strategy modality-aware]
        [--strategy-options '{"inner": "median"}'] [--validation '{"step_multiplier": 0}']
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from broker import topics
from broker.address import BrokerAddress
from broker.runners import MosquittoBroker
from broker.wire import AdapterUpdate, GlobalAdapter, Kind, encode_envelope, modality_of
from broker.wire.bodies import decode_body
from megace.loop.runner import run_loop
from megace.loop.settings import LoopSettings

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.support.collector import Collector  # noqa: E402

SITE, EDGE = "site-evil", "edge-evil"


class Attacker(threading.Thread):
    """Answers each new global with a sign-flipped, amplified B and an absurd sample count."""

    def __init__(self, addr: BrokerAddress, flip: float) -> None:
        super().__init__(daemon=True, name="attacker")
        self.addr, self.flip = addr, flip
        self.stop = threading.Event()
        self.sent = 0
        self._seen = -1

    def run(self) -> None:
        col = Collector(self.addr, *topics.subscriptions(topics.global_down())).start()
        try:
            while not self.stop.wait(0.2):
                globs = [decode_body(env) for t, env in list(col.envelopes) if env.kind is Kind.GLOBAL]
                if not globs or globs[-1].version == self._seen:
                    continue  # "==", not "<=": the previous run's retained global may be seen first
                glob: GlobalAdapter = globs[-1]
                self._seen = glob.version
                tensors = {k: (np.asarray(v, np.float32) * (-self.flip if ".lora_B." in k else 1.0)).astype(np.float32)
                           for k, v in glob.tensors.items()}
                self.sent += 1
                update = AdapterUpdate(edge=EDGE, site=SITE, seq=self.sent, base_version=glob.version,
                                       base_model=glob.base_model, rank=glob.rank, alpha=float(glob.alpha),
                                       samples=10**12, modalities=dict.fromkeys(_modalities(tensors), 1000),
                                       tensors=tensors)
                payload = encode_envelope(Kind.ADAPTER, EDGE, self.sent, update.to_body())
                col.client.publish(topics.adapter_up(SITE), payload, qos=1).wait_for_publish(10)
        finally:
            col.stop()


def _modalities(tensors: dict[str, np.ndarray]) -> set[str]:
    return {m for m in (modality_of(k) for k in tensors) if m is not None}


def one_run(addr: BrokerAddress, seed: int, rounds: int, strategy: str, attacked: bool, flip: float,
            out: Path, cloud: dict[str, Any] | None = None) -> dict[str, Any]:
    attacker = Attacker(addr, flip) if attacked else None
    if attacker is not None:
        attacker.start()
    try:
        settings = LoopSettings(seed=seed, rounds=rounds, strategy=strategy, broker_url=f"mqtt://{addr.host}:{addr.port}",
                                out=out, global_eval=False, extra_cloud=cloud or {})
        result = run_loop(settings)
    finally:
        if attacker is not None:
            attacker.stop.set()
            attacker.join(10)
    final = result.final
    cloud = final.cloud if final is not None else {}
    return {"seed": seed, "attacked": attacked, "final_mean_acc": final.mean_acc if final else None,
            "per_edge": {e.edge: e.device_acc for e in final.edges} if final else {},
            "attacker_uploads": attacker.sent if attacker else 0,
            "cloud_rejected": cloud.get("rejected"), "cloud_neutralised": cloud.get("neutralised"),
            "wall_s": result.wall_s}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--flip", type=float, default=3.0, help="B factors of the global times -flip")
    ap.add_argument("--strategy", default="modality-aware")
    ap.add_argument("--strategy-options", type=json.loads, default={}, help="the cloud's strategy_options (JSON)")
    ap.add_argument("--validation", type=json.loads, default={}, help="the cloud's [validation] overrides (JSON)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "poisoned_loop.json")
    a = ap.parse_args(argv)
    cloud = {"aggregation": {"strategy_options": a.strategy_options}, "validation": a.validation}
    runs: list[dict[str, Any]] = []
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="megace-poisoned-") as tmp, MosquittoBroker() as broker:
        addr = BrokerAddress(broker.host, broker.port)
        for seed in range(a.seeds):
            for attacked in (False, True):  # interleaved: both arms see the same machine load
                runs.append(one_run(addr, seed, a.rounds, a.strategy, attacked, a.flip,
                                    Path(tmp) / f"s{seed}-{'attacked' if attacked else 'clean'}", cloud))
                print(json.dumps(runs[-1]), flush=True)
    clean = [r["final_mean_acc"] for r in runs if not r["attacked"] and r["final_mean_acc"] is not None]
    hit = [r["final_mean_acc"] for r in runs if r["attacked"] and r["final_mean_acc"] is not None]
    deltas = [h - c for c, h in zip(clean, hit, strict=False)]
    result = {
        "bench": "poisoned_loop", "command": "python bench/bench_poisoned_loop.py " + " ".join(sys.argv[1:]),
        "loadavg_at_start": list(load0), "loadavg_at_end": list(os.getloadavg()), "time": time.time(),
        "settings": {"seeds": a.seeds, "rounds": a.rounds, "flip": a.flip, "strategy": a.strategy,
                     "strategy_options": a.strategy_options, "validation": a.validation},
        "runs": runs, "clean_mean_acc": statistics.fmean(clean) if clean else None,
        "attacked_mean_acc": statistics.fmean(hit) if hit else None,
        "delta_points_per_seed": [round(100 * d, 2) for d in deltas],
        "delta_points_mean": round(100 * statistics.fmean(deltas), 2) if deltas else None,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
