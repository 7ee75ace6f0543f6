"""Rows of the README's measured-figures table for the scale-out work: the edge's receiver process, broker
nodes, NATS and cloud-replica failover, and the GPU run (kept apart so ``readme_figures.py`` stays readable)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def _load(name: str) -> dict[str, Any]:
    return json.loads((RESULTS / f"{name}.json").read_text())


def _mark(met: bool) -> str:
    return "met" if met else "**missed**"


def receiver_row() -> list[str]:
    """Every interleaved pair of every run (the committed run and those before it), not only the best of each."""
    er = _load("edge_receiver")
    ing = er["ingest"]
    runs = [[p / b for p, b in zip(r["process_runs_per_s"], r["bare_runs_per_s"], strict=True)]
            for r in ing["earlier_runs"]]
    runs.append(list(ing["modes"]["process"]["ratio_per_repeat"]))
    pairs = [x for run in runs for x in run]
    inline = [r["inline_ratio"] for r in ing["earlier_runs"]] + [ing["modes"]["inline"]["ratio"]]
    loads = [v for r in ing["earlier_runs"] for v in r["loadavg_1min_per_repeat"]] + ing["loadavg_1min_per_repeat"]
    median = statistics.median(pairs)
    return [
        "edge ingest vs bare subscriber, single records, durable ingest on, `ingest_receiver = \"process\"` "
        "(a receiver process logs and acknowledges; MQTT 5 receive window 1,000)",
        f"**{median:.2f}x** median of {len(pairs)} interleaved pairs over {len(runs)} runs "
        f"({sum(x >= 0.8 for x in pairs)} of {len(pairs)} pairs >= 0.8x); inline path in the same runs "
        f"{statistics.median(inline):.2f}x; 1-minute load {min(loads):.1f}-{max(loads):.1f}",
        f">= 0.8x: {_mark(median >= 0.8)}", "`edge_receiver.json` ingest.earlier_runs[], .modes.*", er["command"],
    ]


def broker_row() -> list[str]:
    sc = _load("scaling")
    best = {k: v["best"] for k, v in sc["brokers"].items()}
    names = {"mosquitto": "Mosquitto", "mosquitto-durable": "Mosquitto saving per change", "nats": "NATS",
             "nats-cluster": "NATS 3 nodes (publish node 0, subscribe node 1)", "rabbitmq": "RabbitMQ"}
    figure = "; ".join(f"{names.get(k, k)} {b['received_per_s']:,}/s" for k, b in best.items())
    lost = sum(b["lost"] for b in best.values())
    return [
        f"messages through one broker node, QoS 1, {sc['settings']['payload_bytes']}-byte messages, "
        f"{sc['settings']['publishers']} publishers, one subscriber",
        f"{figure}; {lost} lost", "none set (a floor: clients and brokers share 2 cores)",
        "`scaling.json` brokers.*.best.received_per_s", sc["command"],
    ]


def failover_rows() -> list[list[str]]:
    cf, nf = _load("cloud_failover"), _load("nats_failover")
    s = cf["summary"]
    clean = s["uploads_lost"] == 0 and s["updates_applied_twice"] == 0 and s["versions_forked"] == 0
    cloud = [
        f"kill -9 of the active cloud replica ({cf['setup']['replicas']} replicas on one PostgreSQL ledger, "
        f"lease poll {cf['setup']['lease_poll_s']} s), {len(cf['runs'])} runs",
        f"next global published after median {s['recover_s_median']:.2f} s (max {s['recover_s_max']:.2f} s); "
        f"{s['uploads_lost']} uploads lost, {s['updates_applied_twice']} applied twice, "
        f"{s['versions_forked']} versions forked",
        f"0 lost, 0 twice, no fork: {_mark(clean)}", "`cloud_failover.json` summary.*", cf["command"],
    ]
    rec = nf["phase"]["recovery_s"]
    nats = [
        f"kill -9 of NATS nodes with clients on them ({len(nf['kills'])} kills, 3-node cluster, 2 edges, cloud, "
        "devices spread over the nodes)",
        f"recovery {min(rec):.1f}-{max(rec):.1f} s per kill; {nf['records_lost']} lost, "
        f"{nf['records_duplicated']} duplicated of {nf['records_acked']:,} acknowledged records; "
        f"{nf['uploads_accepted_twice']} uploads twice, {nf['versions_forked']} forks; "
        f"{nf['predictions_unanswered']} of {nf['predictions_requested']:,} predictions unanswered",
        f"0 lost: {_mark(nf['records_lost'] == 0)}; 0 twice, no fork: "
        f"{_mark(nf['versions_applied_twice'] == 0 and nf['versions_forked'] == 0)}",
        "`nats_failover.json` records_*, versions_*, phase.recovery_s", nf["command"].strip(),
    ]
    return [cloud, nats]


def gpu_row() -> list[str]:
    g = _load("gpu")
    dev, sp = g["devices"], g["speedup_gpu_over_cpu"]
    parts = []
    for bb, name in (("tiny", "tiny"), ("minilm", "MiniLM-shaped")):
        cpu, gpu = dev["cpu"][bb], dev["cuda"][bb]
        step = gpu["train_step"]["ms_per_step"], cpu["train_step"]["ms_per_step"]
        parts.append(f"{name}: train step {step[0]:.1f} vs {step[1]:.1f} ms ({sp[bb]['train_step']:.2f}x), "
                     "predict batch 32 p50 "
                     f"{gpu['inference']['batch_32']['p50_ms']:.1f} vs {cpu['inference']['batch_32']['p50_ms']:.1f} ms "
                     f"({sp[bb]['inference_batch_32_p50']:.2f}x), batch 1 {sp[bb]['inference_batch_1_p50']:.2f}x")
    return [
        f"edge Trainer step (batch {g['settings']['batch']}) and Predictor on a GPU ({g['machine']['gpu']}) vs the "
        f"same machine's CPU ({g['machine']['torch_cpu_threads']} threads), one run",
        "; ".join(parts), "record it (issue 12): recorded", "`gpu.json` devices.*, speedup_gpu_over_cpu.*",
        g["command"].replace("/root/out/gpu.json", "bench/results/gpu.json"),
    ]


def fleet_gpu_row() -> list[str]:
    g = _load("fleet_minilm_gpu")
    arms, base, plan = g["arms"], g["cuda_vs_same_machine_cpu"], g["plan"]
    acc = "; ".join(f"{name} {100 * a['personal'][0]:.1f} ± {100 * a['personal'][1]:.1f} / "
                    f"{100 * a['global'][0]:.1f} ({len(a['seeds'])} seeds)" for name, a in arms.items())
    return [
        f"fleet benchmark with the pretrained MiniLM backbone on a GPU ({g['machine']['gpu']}): "
        f"{plan['edges']} edges, alpha {plan['settings'][0].removeprefix('alpha')}, {plan['rounds']} rounds, "
        "personalized / global accuracy %",
        f"{acc}; train step {1000 * arms['megace']['s_per_step']:.0f} ms on the GPU, "
        f"{base['step_speedup']:.2f}x the same machine's CPU ({base['cpu_threads']} threads)",
        "run the MiniLM arms on a GPU (issue 16): recorded; accuracy goals: see the fleet report",
        "`fleet_minilm_gpu.json` arms.*, cuda_vs_same_machine_cpu.*",
        g["command"].replace("/root/out/", "bench/results/"),
    ]


def rows() -> list[list[str]]:
    return [receiver_row(), broker_row(), *failover_rows(), gpu_row(), fleet_gpu_row()]
