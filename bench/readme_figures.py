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

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
HEADING = "## Measured figures"


def _load(name: str) -> dict[str, Any]:
    return json.loads((RESULTS / f"{name}.json").read_text())


def _mark(met: bool) -> str:
    return "met" if met else "**missed**"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _loads(*values: list[float]) -> str:
    """Range of the 1-minute load averages recorded at the starts of the runs."""
    xs = [v[0] for v in values]
    return f"{min(xs):.1f}-{max(xs):.1f}"


def rows() -> tuple[list[list[str]], str]:
    sdk, edge, agg = _load("sdk"), _load("edge"), _load("aggregation")
    out: list[list[str]] = []
    pub = sdk["publish"]
    pairs = ", ".join(f"{x:.2f}" for x in pub["ratio_per_pair"])
    out.append([
        f"SDK publish vs raw paho, QoS 1, {sdk['payload_bytes']:.0f}-byte envelopes",
        f"**{pub['ratio_median']:.2f}x** (median of {len(pub['ratio_per_pair'])} interleaved pairs: {pairs}; "
        f"{statistics.median(pub['sdk_records_per_s']):,.0f} vs {statistics.median(pub['raw_paho_msgs_per_s']):,.0f}"
        " msgs/s)",
        f">= {pub['goal_ratio']}x: {_mark(pub['met'])}",
        "`sdk.json` publish.ratio_median", sdk["command"],
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
    out.append([
        "`import device_sdk`",
        f"{imp['rss_MB_median']:.1f} MB RSS, {imp['import_s_median']:.3f} s (median of 5 fresh interpreters); {heavy}",
        f"< {imp['goal_rss_MB']} MB: {_mark(imp['met_rss_MB'])}; < {imp['goal_import_s']} s: "
        f"{_mark(imp['met_import_s'])}", "`sdk.json` sdk_import.rss_MB_median, .import_s_median", sdk["command"],
    ])
    ing = edge["ingest"]
    out.append([
        "edge ingest vs bare aiomqtt subscriber",
        f"**{ing['ratio']:.2f}x** ({ing['agent_per_s']:,} vs {ing['bare_aiomqtt_per_s']:,} records/s, best of "
        f"{ing['repeats']} interleaved repeats of each side)",
        f">= 0.8x and >= 5,000/s: {_mark(ing['met'])}",
        "`edge.json` ingest.ratio, .agent_per_s, .bare_aiomqtt_per_s", edge["command"],
    ])
    rt = edge["round_trip"]
    out.append([
        "device -> edge -> prediction round trip, tiny model",
        f"p50 {rt['p50_ms']:.1f} ms, p99 {rt['p99_ms']:.1f} ms ({rt['requests']} sequential requests; the"
        f" predictor's forward alone: p50 {rt['forward_p50_ms']:.1f} ms, p99 {rt['forward_p99_ms']:.1f} ms)",
        f"p99 < 20 ms: {_mark(rt['met'])}",
        "`edge.json` round_trip.p50_ms, .p99_ms, .forward_p50_ms, .forward_p99_ms", edge["command"],
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
    load = _loads(sdk["loadavg_at_start"], edge["machine"]["loadavg_at_start"], agg["machine"]["loadavg_at_start"])
    return out, load


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
        *(f"| {' | '.join(r[:4])} | `{r[4]}` |" for r in table),
        "",
        "The CUDA path (the trainer moves to CUDA when present) has not been measured: no GPU was",
        "available to the sessions that produced these figures.",
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
