"""The run folder: ``result.json``, ``report.md`` and PNG plots (matplotlib, Agg: no display needed)."""

from __future__ import annotations

import math
from pathlib import Path

from megace.loop.results import LatencySample, LoopResult, percentile


def _plt():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def per_round_traffic(result: LoopResult) -> list[tuple[int, float, float]]:
    """(round, bytes up, bytes down) summed over edges, as differences of the edges' cumulative counters."""
    out = []
    prev_up = prev_down = 0.0
    for r in result.rounds:
        up = sum(e.bytes_up or 0 for e in r.edges)
        down = sum(e.bytes_down or 0 for e in r.edges)
        out.append((r.round, up - prev_up, down - prev_down))
        prev_up, prev_down = up, down
    return out


def plot_accuracy(result: LoopResult, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    xs = [r.round for r in result.rounds]
    if result.rounds:
        for i, e in enumerate(result.rounds[0].edges):
            ys = [100 * r.edges[i].device_acc for r in result.rounds]
            ax.plot(xs, ys, marker="o", label=f"{e.edge} (r={e.rank}, {'+'.join(e.modalities)})")
        ax.plot(xs, [100 * r.mean_acc for r in result.rounds], "k--", marker="s", label="mean")
    ax.set_xticks(xs)
    ax.set_xlabel("round (global version)")
    ax.set_ylabel("accuracy at the devices, %")
    ax.set_ylim(0, 101)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_traffic(result: LoopResult, path: Path) -> Path:
    plt = _plt()
    rows = per_round_traffic(result)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    xs = [r for r, _, _ in rows]
    ax.bar([x - 0.2 for x in xs], [u / 1024 for _, u, _ in rows], width=0.4, label="edges → cloud")
    ax.bar([x + 0.2 for x in xs], [d / 1024 for _, _, d in rows], width=0.4, label="cloud → edges")
    ax.set_xticks(xs)
    ax.set_xlabel("round")
    ax.set_ylabel("KiB per round (all edges)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_latency(samples: list[LatencySample], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    e2e = [1000 * s.e2e for s in samples]
    if e2e:
        hi = percentile(e2e, 0.99)
        ax.hist([x for x in e2e if x <= hi], bins=40, color="tab:blue", alpha=0.8)
        ax.axvline(percentile(e2e, 0.5), color="k", ls="--", label=f"p50 {percentile(e2e, 0.5):.1f} ms")
        ax.legend(fontsize=8)
    ax.set_xlabel("device → prediction round trip, ms (up to p99)")
    ax.set_ylabel("requests")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def latency_legs(samples: list[LatencySample]) -> dict[str, tuple[float, float]]:
    """p50 and p95 (ms) of each leg of a request and of the whole round trip."""
    legs = {
        "uplink (device → broker → subscribers)": [s.uplink for s in samples],
        "edge (queue, inference, publish)": [s.edge_time for s in samples],
        "downlink (broker → device)": [s.downlink for s in samples],
        "end to end": [s.e2e for s in samples],
    }
    return {k: (percentile([1000 * x for x in v if x is not None], 0.5),
                percentile([1000 * x for x in v if x is not None], 0.95)) for k, v in legs.items()}


def _f(x: float | None, fmt: str = "{:.1f}", scale: float = 1.0) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(scale * x)


def security_line(result: LoopResult) -> str:
    """One paragraph: how the bus was secured and what the signatures caught, or that it was the open demo."""
    sec = result.security or {}
    if not sec.get("secure"):
        what = sec.get("demo") or f"{sec.get('broker', 'broker')} (TLS {'on' if sec.get('tls') else 'off'}, " \
                                    "no per-role identities or signatures)"
        return f"**Bus: not secured** — {what}."
    ids = ", ".join(f"{n} {role}" for role, n in sorted((sec.get("identities") or {}).items()))
    rej = sec.get("signature_rejections") or {}
    by = ", ".join(f"{k} {v}" for k, v in (rej.get("by") or {}).items() if v)
    signed = sec.get("signed_on_bus") or {}
    shares = ", ".join(f"{k} {v[0]}/{v[1]}" for k, v in signed.items() if isinstance(v, list | tuple) and len(v) == 2)
    return (f"**Bus: secured** — {sec.get('broker', 'private Mosquitto')}, no anonymous access; "
            f"{sec.get('tls', 'TLS')}; one identity each ({ids}) with its own ACL; {sec.get('signatures', '')}. "
            f"Signature rejections: **{rej.get('total', '-')}**" + (f" ({by})" if by else "")
            + (f"; signed on the bus: {shares}" if shares else "") + ".")


def render_markdown(result: LoopResult) -> str:
    s = result.settings
    lines = [
        f"# megace run — {s['dataset']}, {s['edges']} edges, strategy `{s['strategy']}`",
        "",
        f"{len(result.rounds)} rounds in {result.wall_s:.0f} s ({result.stopped_because}). "
        f"Backbone `{s['backbone']}`, Dirichlet alpha {s['alpha']} (label skew {result.label_skew:.2f}), "
        f"{s['devices_per_edge']} devices per edge, seed {s['seed']}.",
        "",
        security_line(result),
        "",
        "Accuracy is measured **at the devices**: each device sends its own held-out test samples as inference "
        "requests over MQTT and compares the edge's `Prediction` with the label (personalized accuracy). "
        "*Global* accuracy: after the last round each edge answers the whole test set (in its modalities).",
        "",
        "## Accuracy per round (%, device-measured; held-out = the edge's own recent-data check)",
        "",
    ]
    if result.rounds:
        edges = result.rounds[0].edges
        lines.append("| round | global v | " + " | ".join(f"{e.edge} r={e.rank} {'+'.join(e.modalities)}"
                                                        for e in edges) + " | mean |")
        lines.append("|---" * (len(edges) + 3) + "|")
        for r in result.rounds:
            cells = [f"{_f(e.device_acc, scale=100)} ({_f(e.heldout_acc, scale=100)})" for e in r.edges]
            lines.append(f"| {r.round} | {_f(r.global_version, '{:.0f}')} | " + " | ".join(cells)
                         + f" | **{_f(r.mean_acc, scale=100)}** |")
        lines += ["", "![accuracy](accuracy.png)", "", "## Final per edge", "",
                  "| edge | rank | modalities | train / test samples | personal acc % | global acc % | "
                  "KiB up | KiB down |", "|---|---|---|---|---|---|---|---|"]
        final = result.rounds[-1]
        for e in final.edges:
            part = result.partition.get(e.edge, {})
            lines.append(
                f"| {e.edge} | {e.rank} | {'+'.join(e.modalities)} | {part.get('train', '-')} / "
                f"{part.get('test', '-')} | {_f(e.device_acc, scale=100)} | "
                f"{_f(result.global_acc.get(e.edge), scale=100)} | {_f(e.bytes_up, '{:.0f}', 1 / 1024)} | "
                f"{_f(e.bytes_down, '{:.0f}', 1 / 1024)} |")
        if result.params:
            lines += ["", "Shared adapter size (what an edge uploads per round) vs the whole model:", "",
                      "| edge | shared params | model params | shared % |", "|---|---|---|---|"]
            for edge, p in result.params.items():
                lines.append(f"| {edge} | {p['shared']:,} | {p['total']:,} | {100 * p['shared'] / p['total']:.2f} |")
    lines += ["", "## Traffic per round (all edges)", "", "| round | KiB up | KiB down |", "|---|---|---|"]
    lines += [f"| {r} | {u / 1024:.1f} | {d / 1024:.1f} |" for r, u, d in per_round_traffic(result)]
    lines += ["", "![traffic](traffic.png)", "", "## Prediction latency", ""]
    if result.latency:
        split = sum(s.split for s in result.latency)
        lines += [f"{len(result.latency)} requests, all rounds. Legs come from a passive tap on the bus (when the "
                  "request and the answer reach subscribers), on the devices' clock; "
                  f"{split} requests could be split (for the others the tap saw the request only after the device "
                  "had the answer).",
                  "", "| leg | p50 ms | p95 ms |", "|---|---|---|"]
        lines += [f"| {k} | {p50:.2f} | {p95:.2f} |" for k, (p50, p95) in latency_legs(result.latency).items()]
    lines += ["", "![latency](latency.png)", "", "Settings: `" + ", ".join(
        f"{k}={v}" for k, v in s.items() if k not in ("extra_edge", "extra_cloud") and v is not None) + "`", ""]
    return "\n".join(lines)


def write_report(result: LoopResult, out: Path) -> Path:
    """Write result.json, the plots and report.md into ``out``; returns the report's path."""
    out.mkdir(parents=True, exist_ok=True)
    result.write(out / "result.json")
    plot_accuracy(result, out / "accuracy.png")
    plot_traffic(result, out / "traffic.png")
    plot_latency(result.latency, out / "latency.png")
    path = out / "report.md"
    path.write_text(render_markdown(result))
    return path


__all__ = ["latency_legs", "per_round_traffic", "render_markdown", "security_line", "write_report"]
