"""Regenerate the README's "Measured figures" section from the committed benchmark JSON.

Every figure in that table is read from a field of ``bench/results/*.json`` (named in the table's
source column), and every goal is marked met or missed from the numbers, so the README cannot
drift from what the documented commands produced.

    python bench/readme_figures.py [--readme README.md] [--check]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import figures_scaling  # beside this script (run as `python bench/readme_figures.py`)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
HEADING = "## Measured figures"


def _load(name: str) -> dict[str, Any]:
    return json.loads((RESULTS / f"{name}.json").read_text())


def _mark(met: bool) -> str:
    return "met" if met else "**missed**"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _count(kills: Any) -> int:
    if isinstance(kills, dict):
        return sum(int(v) for v in kills.values())
    return len(kills) if isinstance(kills, list) else int(kills)


def _loads(*values: list[float]) -> str:
    """Range of the 1-minute load averages recorded at the starts of the runs."""
    xs = [v[0] for v in values]
    return f"{min(xs):.1f}-{max(xs):.1f}"


def rows() -> tuple[list[list[str]], str]:
    sdk, edge, agg = _load("sdk"), _load("edge"), _load("aggregation")
    out: list[list[str]] = []
    pub = sdk["publish"]
    if "ratio_quartiles" in pub:  # many pairs: their middle half and the CPU each side spent per message
        lo, hi = pub["ratio_quartiles"]
        pairs = (f"middle half {lo:.2f}-{hi:.2f}, range {min(pub['ratio_per_pair']):.2f}-"
                 f"{max(pub['ratio_per_pair']):.2f}; process CPU per message {pub['cpu_ratio_median']:.2f}x raw paho's")
    else:
        pairs = ", ".join(f"{x:.2f}" for x in pub["ratio_per_pair"])
    out.append([
        f"SDK publish vs raw paho, QoS 1, {sdk['payload_bytes']:.0f}-byte envelopes",
        f"**{pub['ratio_median']:.4f}x** (median of {len(pub['ratio_per_pair'])} interleaved pairs: {pairs}; "
        f"{statistics.median(pub['sdk_records_per_s']):,.0f} vs {statistics.median(pub['raw_paho_msgs_per_s']):,.0f}"
        " msgs/s)",
        f">= {pub['goal_ratio']}x: {_mark(pub['met'])}",
        "`sdk.json` publish.ratio_median", sdk["command"],
    ])
    pb = sdk["publish_batched"]
    out.append([
        f"SDK batched (linger {pb['linger_ms']:g} ms, up to {pb['batch_max']} records a message) vs raw paho "
        "single-record messages, QoS 1",
        f"**{pb['ratio_median']:.1f}x** records/s (median of {len(pb['ratio_per_pair'])} pairs; "
        f"{statistics.median(pb['sdk_batched_records_per_s']):,.0f} records/s vs "
        f"{statistics.median(pb['raw_paho_msgs_per_s']):,.0f} msgs/s)",
        f">= {pb['goal_ratio']:g}x: {_mark(pb['met'])}", "`sdk.json` publish_batched.ratio_median", sdk["command"],
    ])
    c1, c2 = sdk["codec_384_floats"], sdk["codec_1MiB_array"]
    out.append([
        "1 MiB array decode",
        f"{c2['decode_vs_memcpy']:.2f}x of a plain memcpy of the same bytes (zero-copy view; the cost is msgpack's"
        " one copy)", "near memcpy (no threshold set)", "`sdk.json` codec_1MiB_array.decode_vs_memcpy", sdk["command"],
    ])
    out.append([
        "384-float record encode / decode",
        f"{c1['encode_per_s']:,.0f} / {c1['decode_per_s']:,.0f} records/s on one core", "none set",
        "`sdk.json` codec_384_floats.encode_per_s, .decode_per_s", sdk["command"],
    ])
    imp = sdk["sdk_import"]
    heavy = "torch/transformers/onnxruntime imported" if imp["heavy_modules_imported"] else \
        "no torch/transformers/onnxruntime"
    first = "" if "rss_after_first_numpy_publish_MB_median" not in imp else (
        f"; numpy {'imported' if imp['numpy_imported_by_import'] else 'not imported'}; after connecting and a first "
        f"publish {imp['rss_after_first_numpy_publish_MB_median']:.1f} MB with a numpy record, "
        f"{imp['rss_after_first_buffer_publish_MB_median']:.1f} MB with an `array.array` record (numpy "
        f"{'loaded' if imp['numpy_imported_by_buffer_publish'] else 'never loaded'})")
    out.append([
        "`import device_sdk`",
        f"{imp['rss_MB_median']:.1f} MB RSS, {imp['import_s_median']:.3f} s (median of "
        f"{imp.get('runs', 5)} fresh interpreters); {heavy}{first}",
        f"< {imp['goal_rss_MB']} MB: {_mark(imp['met_rss_MB'])}; < {imp['goal_import_s']} s: "
        f"{_mark(imp['met_import_s'])}", "`sdk.json` sdk_import.rss_MB_median, .import_s_median"
        + (", .rss_after_first_numpy_publish_MB_median, .rss_after_first_buffer_publish_MB_median" if first else ""),
        sdk["command"],
    ])
    ing = edge["ingest"]
    inline = ing.get("modes", {}).get("inline")
    out.append([
        "edge ingest vs bare aiomqtt subscriber, single records, durable ingest on"
        + (f" (`ingest_receiver` {ing['ingest_receiver']}, the default)" if "ingest_receiver" in ing else ""),
        f"**{ing['ratio']:.2f}x** ({ing['agent_per_s']:,} vs {ing['bare_aiomqtt_per_s']:,} records/s, best of "
        f"{ing['repeats']} interleaved repeats of each side"
        + (f"; inline in the same repeats {inline['ratio']:.2f}x)" if inline else ")"),
        f">= 0.8x and >= 5,000/s: {_mark(ing['met'])}",
        "`edge.json` ingest.ratio, .agent_per_s, .bare_aiomqtt_per_s", edge["command"],
    ])
    ib = edge["ingest_batched"]
    out.append([
        f"edge ingest of batched records ({ib['records_per_batch']} a message), durable ingest on",
        f"**{ib['agent_records_per_s']:,} records/s** (best of {ib['repeats']}; {ib['agent_rejected']} rejected, "
        f"{ib['agent_duplicates']} duplicates)",
        f">= 100,000 records/s: {_mark(ib['met'])}", "`edge.json` ingest_batched.agent_records_per_s",
        edge["command"],
    ])
    rt = edge["round_trip"]
    out.append([
        "device -> edge -> prediction round trip, tiny model",
        f"p50 {rt['p50_ms']:.1f} ms, p99 {rt['p99_ms']:.1f} ms ({rt['requests']} sequential requests; the"
        f" predictor's forward alone: p50 {rt['forward_p50_ms']:.1f} ms, p99 {rt['forward_p99_ms']:.1f} ms)",
        f"p99 < 20 ms: {_mark(rt['met'])}",
        "`edge.json` round_trip.p50_ms, .p99_ms, .forward_p50_ms, .forward_p99_ms", edge["command"],
    ])
    for key, how in (("round_trip_training", "inference thread"), ("round_trip_training_process", "inference process")):
        if key not in edge:
            continue
        rtt = edge[key]
        out.append([
            f"device -> edge -> prediction round trip while the edge trains ({how}), tiny model",
            f"p50 {rtt['p50_ms']:.1f} ms, p99 {rtt['p99_ms']:.1f} ms ({rtt['requests']} sequential requests, "
            f"{rtt['training_steps_during']} optimizer steps meanwhile)",
            f"p99 < 20 ms: {_mark(rtt['met'])}", f"`edge.json` {key}.p50_ms, .p99_ms", edge["command"],
        ])
    tr = edge["training_step"]
    ratios = ", ".join(f"{r['speed_ratio']:.2f}x ({r['backbone']})" for r in tr["results"])
    out.append([
        "edge training step vs bare peft loop", f"{ratios}, best of 3 interleaved repeats",
        f">= 0.9x: {_mark(tr['met'])}", "`edge.json` training_step.results[].speed_ratio", edge["command"],
    ])
    ad = edge["adapter_size"]
    pct = " / ".join(f"{r['shared_pct']:.3f}%" for r in ad["results"])
    kb = ", ".join(f"{r['upload_bytes_fp16'] / 1000:.0f} KB" for r in ad["results"])
    ranks = " / ".join(f"r={r['rank']}" for r in ad["results"])
    out.append([
        f"shared adapter, MiniLM {ranks}", f"**{pct}** of parameters ({kb} as fp16 uploads)",
        f"<= 0.5% (ML-ECS: 0.65%): {_mark(ad['met'])}",
        "`edge.json` adapter_size.results[].shared_pct, .upload_bytes_fp16", edge["command"],
    ])
    rb = _load("round_bytes")
    cells = "; ".join(
        f"{r['strategy']} ranks {'/'.join(str(x) for x in sorted(set(r['ranks']), reverse=True))} N={r['n']}: "
        f"{r['before']['adapter_copies_per_round']:.1f} -> **{r['after']['adapter_copies_per_round']:.1f}** "
        f"(goal {r['goal_copies']})" for r in rb["results"])
    out.append([
        "adapter copies on the wire per aggregation round (pub/sub count: upload 2, global 1+N, feedback 2), "
        "before -> after views became cuts", cells,
        f"<= 3N+1: {_mark(all(r['met'] for r in rb['results']))}; edges end with identical weights: "
        f"{_mark(all(r['edges_identical'] for r in rb['results']))}",
        "`round_bytes.json` results[].after.adapter_copies_per_round", rb["command"].strip(),
    ])
    cr = _load("cloud_rss")
    b, a, n = cr["runs"]["before"], cr["runs"]["after"], cr["runs"]["numpy"]
    out.append([
        "cloud aggregator RSS, MiniLM r=8, 3 sites x 3 rounds (peak of the service process), before -> "
        "version 0 in a builder process -> the service's maths in numpy (it never imports torch)",
        f"fresh state {b['fresh']['peak_mib']:.0f} -> {a['fresh']['peak_mib']:.0f} -> **{n['fresh']['peak_mib']:.0f} "
        f"MiB** (builder child meanwhile: {n['fresh']['peak_tree_mib']:.0f} MiB together); restart "
        f"{b['restart']['peak_mib']:.0f} -> {a['restart']['peak_mib']:.0f} -> **{n['restart']['peak_mib']:.0f} MiB**; "
        f"`import torch` alone {n['torch_import_mib']:.0f} MiB",
        f"<= 210 MiB: {_mark(n['met'])}",
        "`cloud_rss.json` runs.{before,after,numpy}.{fresh,restart}.peak_mib", n["command"],
    ])
    at = {r["strategy"]: r for r in agg["results"] if r["edges"] == 1000}
    fastest_first = sorted(at.items(), key=lambda kv: kv[1]["aggregate_s"])
    times = ", ".join(f"{k} {_ms(v['aggregate_s'])}" for k, v in fastest_first)
    growth = agg["growth_1000_over_100"]
    lin = ", ".join(f"{k} {growth[k]:.1f}x" for k in agg["linear"]) or "none"
    sup = ", ".join(f"{k} {growth[k]:.1f}x" for k in agg["superlinear"])
    linear_goal = f"linear: met for {lin}" + (f"; **missed** for {sup}" if sup else "")
    out.append([
        "aggregate 1,000 rank-8 MiniLM adapters", f"{times} (median of {len(at['fedavg']['aggregate_s_runs'])})",
        f"fedavg < 1 s: {_mark(agg['met_fedavg_under_1s'])}; time from 100 to 1,000 edges, {linear_goal} "
        f"(linear: at most {agg['linear_max_growth']:.0f}x)",
        "`aggregation.json` results[edges=1000].aggregate_s, growth_1000_over_100", agg["command"],
    ])
    fl = _load("flower")
    cells = "; ".join(
        f"N={r['n']}: megace **{_ms(r['megace']['median_s'])}** vs Flower {_ms(r['flower']['median_s'])}, "
        f"**{r['ratio_flower_over_megace']:.0f}x** (medians of {len(r['megace']['rounds_s'])} / "
        f"{len(r['flower']['rounds_s'])} rounds)" for r in fl["results"])
    out.append([
        f"aggregation round, FedAvg over a buffer of N, {fl['results'][0]['megace']['payload_floats']:,} float32 per "
        "edge, no training: megace (Mosquitto, cloud service, N simulated edges) vs Flower "
        f"{fl['flower']['version']} deployment runtime (SuperLink + N SuperNodes), same run", cells,
        f"{fl['goal']}: {_mark(fl['met'])}",
        "`flower.json` results[].ratio_flower_over_megace, .megace.median_s, .flower.median_s", fl["command"],
    ])
    out.extend(artifact_rows())
    sec = _load("security")
    out.extend(security_rows(sec))
    out.extend(reliability_rows())
    load = _loads(sdk["loadavg_at_start"], edge["machine"]["loadavg_at_start"], agg["machine"]["loadavg_at_start"],
                  sec["loadavg_at_start"], fl["machine"]["loadavg_at_start"])
    return out, load


def artifact_rows() -> list[list[str]]:
    """ONNX at the edge and on devices (issue 13): inference backends, on-device latency, memory, download."""
    onnx, dev, ext = _load("onnx"), _load("device_model"), _load("extractors")
    one = [r for r in onnx["results"] if r["threads"] == 1]
    cells = "; ".join(f"{r['model']} batch {b['batch']}: **{b['ratio']:.2f}x** ({b['torch']['p50_ms']:.1f} vs "
                      f"{b['onnx']['p50_ms']:.1f} ms)" for r in one for b in r["results"])
    parity = max(r["parity_max_abs"] for r in onnx["results"])
    lat, dp, dl = dev["latency"], dev["device_process"], dev["download"]
    return [
        ["edge inference, onnxruntime vs torch on the same weights (torch time / onnxruntime time, 1 thread)",
         f"{cells}; parity <= {parity:.1g}", "measure both, serve the faster: onnxruntime chosen for "
         f"{', '.join(sorted({r['model'] for r in one if r['auto_serves'] == 'onnx'}))}",
         "`onnx.json` results[threads=1].results[].ratio", onnx["command"]],
        ["prediction on the device (SDK + onnxruntime, tiny model) vs the round trip to the edge",
         f"p50 {lat['local_p50_ms']:.2f} ms vs {lat['edge_round_trip_p50_ms']:.1f} ms (p99 {lat['local_p99_ms']:.2f}"
         f" vs {lat['edge_round_trip_p99_ms']:.1f} ms; {lat['requests']} requests; probabilities differ by at most "
         f"{lat['max_abs_prob_diff_local_vs_edge']:.0e})", "none set",
         "`device_model.json` latency.*", dev["command"]],
        ["SDK process RSS with onnxruntime and the tiny model (1.8 MB) loaded, after predicting",
         f"**{dev['rss_peak_mb']:.1f} MB** (import {dp['after_import']['VmRSS']:.1f}, onnxruntime "
         f"{dp['after_onnxruntime_import']['VmRSS']:.1f}, model {dp['after_model_load']['VmRSS']:.1f} MB; private "
         f"{dp['after_predict']['Private']:.1f} MB)", f"< {dev['rss_goal_mb']} MB: {_mark(dev['met'])}",
         "`device_model.json` rss_peak_mb, device_process.*", dev["command"]],
        ["model download per device (signed, chunked)",
         f"{dl['wire_bytes_per_device']:,} bytes in {dl['messages']} messages for a {dev['model']['onnx_bytes']:,}-"
         f"byte model; pushed to installed in {dl['push_to_installed_s']:.2f} s", "none set",
         "`device_model.json` download.*", dev["command"]],
        ["feature extractors on the device, no torch (MiniLM text encoder, IMU front end)",
         f"text {ext['latency']['text_sentence_tokens']['p50_ms']:.1f} ms a sentence, IMU window "
         f"{ext['latency']['imu_window']['p50_ms']:.2f} ms; RSS {ext['memory_mb']['after_running']['VmRSS']:.0f} MB "
         f"with both, {ext['memory_mb']['imu_only_process']['VmRSS']:.0f} MB IMU only", "none set",
         "`extractors.json` latency.*, memory_mb.*", ext["command"]],
    ]


def security_rows(sec: dict[str, Any]) -> list[list[str]]:
    """Signing cost, TLS publish ratio, and what each poisoning attack does to the global with the guards."""
    sg, tp = sec["signing"]["messages"], sec["tls_publish"]
    g, u = sg["global_adapter_fp32"], sg["edge_upload_fp32"]
    r, m = tp["ratio_over_plain_median"], tp["records_per_s_median"]
    pairs = "; ".join(f"{a}: " + ", ".join(f"{x:.2f}" for x in v) for a, v in tp["ratio_over_plain_per_repeat"].items())
    poison = _load("poisoning")
    fed = {(x["settings"], x["attack"]): x["worst_norm_ratio"] for x in poison["results"] if x["rule"] == "fedavg"}
    attacks = [a for a in ("first-1e4", "factor-rescale", "samples-1e12", "norm-x15", "replay-fresh-seq", "flip-x3")
               if ("guards", a) in fed]
    per_attack = "; ".join(f"{a} {fed[('guards', a)]:.2f}x (without: {fed[('legacy', a)]:,.2f}x)" for a in attacks)
    bounded = all(fed[("guards", a)] <= 1.5 for a in attacks)
    return [
        [f"Ed25519 sign / verify, MiniLM r=8 global and edge upload ({u['envelope_bytes'] / 1000:.0f} KB fp32)",
         f"global {g['sign_ms']:.2f} / {g['verify_ms']:.2f} ms, upload {u['sign_ms']:.2f} / {u['verify_ms']:.2f} ms "
         f"({u['sign_over_encode']:.0f}x / {u['verify_over_decode']:.0f}x the encode / decode of the same envelope; "
         f"median of {sec['signing']['repetitions']})",
         "none set", "`security.json` signing.messages.*.sign_ms, .verify_ms", sec["command"]],
        [f"SDK publish over TLS vs no TLS (same broker, password + ACL), QoS 1, {tp['payload_bytes']}-byte envelopes",
         f"password TLS **{r['tls_password']:.2f}x**, mutual TLS **{r['mtls']:.2f}x** (median of {tp['repeats']} "
         f"interleaved repeats: {pairs}; {m['tls_password']:,} / {m['mtls']:,} vs {m['plain_password']:,} records/s)",
         "none set", "`security.json` tls_publish.ratio_over_plain_median", sec["command"]],
        _poisoned_loop_row(),
        ["one poisoning edge among four: global norm / honest-only global norm (fedavg, worst of 3 rounds)",
         per_attack, f"<= 1.5x for every attack: {_mark(bounded)}", "`poisoning.json` results[].worst_norm_ratio",
         poison["command"]],
    ]


def _poisoned_loop_row() -> list[str]:
    """The closed loop with one sign-flipping edge among four: the default rule, median (``--secure``'s), and
    modality-aware around median."""
    arms = {name: _load(name) for name in ("poisoned_loop", "poisoned_loop_median", "poisoned_loop_ma_median")}

    def label(d: dict[str, Any]) -> str:
        inner = d["settings"].get("strategy_options", {}).get("inner")
        name = d["settings"]["strategy"] + (f"({inner})" if inner else "")
        return name + (" [--secure default]" if name == "median" else "")

    text = "; ".join(f"{label(d)}: {d['delta_points_mean']:+.1f} points (per seed "
                     f"{', '.join(f'{x:+.1f}' for x in d['delta_points_per_seed'])}; clean "
                     f"{100 * d['clean_mean_acc']:.1f}%)" for d in arms.values())
    verdicts = ", ".join(f"{label(d)} {_mark(abs(d['delta_points_mean']) <= 2)}" for d in arms.values())
    base = arms["poisoned_loop"]["settings"]
    return [f"closed loop, one edge among four flipping and amplifying B (x-{base['flip']:g}) and claiming "
            f"10^12 samples: final accuracy change at the honest devices ({base['seeds']} seeds; every guard on, "
            "step clipping included)",
            text, f"within 2 points: {verdicts}", "`poisoned_loop*.json` delta_points_mean",
            arms["poisoned_loop"]["command"] + " [--strategy median | --strategy-options '{\"inner\": \"median\"}']"]


def reliability_rows() -> list[list[str]]:
    """Faults injected and survived, inputs fuzzed, load held; records lost (goal 0)."""
    out: list[list[str]] = []
    dur = _load("durability")
    kills = {k["profile"]: k for k in dur["kills"]}
    new, old = kills["after-every-change"], kills["every-30s"]
    out.append([f"broker kill -9 x{new['kills']} under QoS 1 load: acknowledged records lost",
                f"{new['lost']} of {new['acked']:,} with save-after-every-change (was {old['lost']:,} of "
                f"{old['acked']:,} with a save every 30 s); sessions lost: {new['subscriber_sessions_lost']}",
                f"0: {_mark(new['lost'] == 0)} (Mosquitto 2.0 has no write-ahead log: about one record per "
                "connection per kill remains)", "`durability.json` kills[].lost, .acked", dur["command"]])
    ek = _load("edge_kill")
    out.append([f"edge kill -9 x{ek['kills']} while a device streams at QoS 1",
                f"{ek['lost_count']} lost, {ek['duplicated_count']} duplicated of {ek['acked']:,} acknowledged records",
                f"0 lost, 0 twice: {_mark(ek['lost_count'] == 0 and ek['duplicated_count'] == 0)}",
                "`edge_kill.json` lost_count, duplicated_count, acked", ek["command"]])
    sk = _load("system_kill")
    parts, clean = [], True
    for fault, ph in sk["phases"].items():
        clean = clean and not (ph["records_lost"] or ph["records_duplicated"] or ph["uploads_accepted_twice"]
                               or ph["versions_forked"] or ph["predictions_unanswered"])
        parts.append(f"{fault} x{_count(ph['kills'])}: {ph['records_lost']} lost, {ph['records_duplicated']} twice of "
                     f"{ph['records_acked']:,} records; {ph['uploads_accepted_twice']} uploads applied twice; "
                     f"{ph['versions_forked']} forks; {ph['predictions_answered']}/{ph['predictions_requested']} "
                     "predictions answered")
    out.append(["kill -9 of edge, cloud and broker at random moments, whole system (2 edges, cloud, devices)",
                "; ".join(parts), f"0 lost, 0 twice, no fork, every prediction answered: {_mark(clean)}",
                "`system_kill.json` phases.*", sk["command"]])
    lt = _load("load_test")
    run = lt["runs"][0]
    out.append([f"{run['devices']:,} devices x {run['offered_per_s'] / run['devices']:.0f} records/s against one edge",
                f"{run['lost']} lost, {run['duplicated']} duplicated of {run['acked_by_broker']:,}; ingest "
                f"{run['edge_ingest_per_s_during_load']:,.0f}/s during the load (offered "
                f"{run['offered_per_s']:,.0f}/s), backlog drained {run['drain_after_load_s']:.0f} s later; "
                f"edge RSS peak {max(run['edge_rss_mb'].values()):,.0f} MB",
                f"0 lost: {_mark(run['lost'] == 0)}; keeps up with the offered rate: "
                f"{_mark(run['edge_ingest_per_s_during_load'] >= run['offered_per_s'])}",
                "`load_test.json` runs[0]", lt["command"]])
    fz = json.loads((ROOT / "reports" / "fuzz" / "fuzz-long-run.json").read_text())
    out.append(["fuzzing every decoder and both services' message handlers (hypothesis, structured inputs)",
                f"{fz['inputs_total']:,} inputs, {fz['internal_errors_total']} internal errors "
                f"({fz['duration_s'] / 60:.0f} min)", f"0 errors: {_mark(fz['internal_errors_total'] == 0)}",
                "`reports/fuzz/fuzz-long-run.json`", fz["command"]])
    at = json.loads((ROOT / "reports" / "fuzz" / "fuzz-atheris.json").read_text())
    both = fz["inputs_total"] + at["inputs_total"]
    out.append(["fuzzing the same targets coverage-guided (atheris/libFuzzer, seeded from the hypothesis strategies)",
                f"{at['inputs_total']:,} inputs ({at['reached_total']:,} reached a target as a well-formed script, "
                f"body or document), {at['internal_errors_total']} internal errors ({at['duration_s'] / 60:.0f} min); "
                f"with the hypothesis run: {both:,}",
                f">= 1,000,000 inputs: {_mark(both >= 1_000_000)}; 0 errors: "
                f"{_mark(at['internal_errors_total'] == 0 and not at['targets_unfinished'])}",
                "`reports/fuzz/fuzz-atheris.json`", at["command"]])
    return out


def section() -> str:
    table, load = rows()
    lines = [
        HEADING, "",
        "Generated by `python bench/readme_figures.py` from the committed benchmark output in `bench/results/`;",
        "each row names the JSON fields it comes from and the command that wrote them (the JSON records the",
        "command and the machine's load average). Each benchmark compares against a baseline in the same run",
        "on the same broker, with the same client settings, QoS and payload bytes on both sides, and",
        f"interleaved repeats, because the 2-core machines these ran on were shared (1-minute load average {load}",
        "when the runs started): read the ratios, not the absolute rates. Goals that are not met are marked missed.",
        "",
        "| what | figure | goal | source | command |",
        "|---|---|---|---|---|",
        *(f"| {' | '.join(r[:4])} | `{r[4]}` |" for r in [*table, *figures_scaling.rows()]),
        "", "",
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    ap.add_argument("--check", action="store_true", help="exit 1 if the README's section differs from the JSON")
    a = ap.parse_args()
    text = a.readme.read_text()
    start = text.index(HEADING)
    end = text.find("\n## ", start + len(HEADING))
    end = len(text) if end < 0 else end + 1
    new = text[:start] + section() + text[end:]
    if a.check:
        if new != text:
            print(f"{a.readme}: the measured figures differ from bench/results/*.json", file=sys.stderr)
            return 1
        return 0
    a.readme.write_text(new)
    print(f"rewrote the {HEADING!r} section of {a.readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
