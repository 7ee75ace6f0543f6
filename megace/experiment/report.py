"""``experiment.md``: the comparison tables with the issue's goals beside them, plots and raw JSON."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

from megace.experiment.plan import ARM_BY_NAME, ExperimentPlan
from megace.experiment.summary import ArmStats, RunMetrics, arm_stats
from megace.loop.results import percentile

BACKBONE_TEXT = {
    "tiny": "tiny frozen BERT backbone (hidden 128, 2 layers, random, frozen)",
    "minilm": "frozen pretrained all-MiniLM-L6-v2 backbone (hidden 384, 6 layers, 22.7 M parameters)",
}
GOAL_MARGIN = 3.0  # points over FedIT
TRAFFIC_GOAL = 0.5  # % of the model's parameters per round


def _pm(x: tuple[float, float], scale: float = 100.0) -> str:
    m, s = x
    return "-" if math.isnan(m) else f"{scale * m:.1f} ± {scale * s:.1f}"


def _plt():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _stats(plan: ExperimentPlan, metrics: list[RunMetrics]) -> dict[str, dict[str, ArmStats]]:
    out: dict[str, dict[str, ArmStats]] = {}
    for task in plan.tasks:
        for arm in plan.arms:
            runs = [m for m in metrics if m.task == task and m.arm == arm]
            if runs:
                out.setdefault(task, {})[arm] = arm_stats(runs, plan.rounds)
    return out


def plot_bars(stats: dict[str, dict[str, ArmStats]], path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, max(len(stats), 1), figsize=(6 * max(len(stats), 1), 4), squeeze=False)
    for ax, (task, arms) in zip(axes[0], stats.items(), strict=False):
        names = list(arms)
        colors = ["tab:red" if ARM_BY_NAME[n].group == "megace" else
                  "tab:orange" if ARM_BY_NAME[n].group == "ablation" else "tab:gray" for n in names]
        ax.bar(range(len(names)), [100 * arms[n].personal[0] for n in names],
               yerr=[100 * arms[n].personal[1] for n in names], color=colors, capsize=3)
        ax.scatter(range(len(names)), [100 * arms[n].global_[0] for n in names], marker="_", s=200, color="k",
                   label="global acc", zorder=3)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("personalized accuracy, % (mean ± std)")
        ax.set_title(task)
        ax.set_ylim(0, 101)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(stats: dict[str, dict[str, ArmStats]], path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, max(len(stats), 1), figsize=(6 * max(len(stats), 1), 3.8), squeeze=False)
    for ax, (task, arms) in zip(axes[0], stats.items(), strict=False):
        for name, st in arms.items():
            style = "-" if ARM_BY_NAME[name].group != "ablation" else ":"
            lw = 2.5 if ARM_BY_NAME[name].group == "megace" else 1.2
            ax.plot(range(1, len(st.curve) + 1), [100 * c for c in st.curve], style, lw=lw, marker="o", ms=3,
                    label=name)
        ax.set_xticks(range(1, max((len(st.curve) for st in arms.values()), default=1) + 1))
        ax.set_xlabel("round (global version)")
        ax.set_ylabel("mean personalized accuracy, %")
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_traffic(stats: dict[str, dict[str, ArmStats]], path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, max(len(stats), 1), figsize=(6 * max(len(stats), 1), 3.6), squeeze=False)
    for ax, (task, arms) in zip(axes[0], stats.items(), strict=False):
        names = [n for n in arms if n != "local-only"]
        ax.bar(range(len(names)), [arms[n].upload_pct for n in names], color="tab:blue")
        ax.axhline(TRAFFIC_GOAL, color="r", ls="--", label=f"goal ≤ {TRAFFIC_GOAL}%")
        ax.set_yscale("log")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("numbers uploaded per edge per round,\n% of the edge model's parameters")
        ax.set_title(task)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _latency_rows(metrics: list[RunMetrics], task: str, featgen: tuple[float, float],
                  infer: tuple[float, float]) -> list[str]:
    lat = [x for m in metrics if m.task == task and m.arm == "megace" for x in m.latency]

    def leg(key: str) -> tuple[float, float]:
        xs = [1000 * x[key] for x in lat if x.get(key) is not None]
        return percentile(xs, 0.5), percentile(xs, 0.95)

    rows = [("feature generation (device, numpy)", featgen),
            ("transmission device → edge (QoS 1, via broker)", leg("uplink")),
            ("at the edge: decode, queue, inference, encode", leg("edge_time")),
            ("  of which inference alone (model forward, 1 thread, measured apart)", infer),
            ("result transmission edge → device", leg("downlink")),
            ("end to end at the device (request → prediction)", leg("e2e"))]
    out = [f"| {name} | {p50:.2f} | {p95:.2f} |" for name, (p50, p95) in rows]
    out.append(f"| end to end incl. feature generation (sum of p50s) | {featgen[0] + leg('e2e')[0]:.2f} | |")
    return out


def _verdict(d: float, a: tuple[float, float], b: tuple[float, float], threshold: float = 0.0) -> str:
    """met / missed, flagged when the difference is smaller than the seeds' spread (not resolved by this run)."""
    noise = 100 * max(a[1], b[1])
    ok = d >= threshold if threshold else d > 0
    word = "met" if ok else "**missed**"
    return f"{word} (within noise: std {noise:.1f})" if abs(d - threshold) < noise else word


def _pct_cell(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.2f}"


def _goal_lines(stats: dict[str, dict[str, ArmStats]], minilm: dict[int, dict[str, int]]) -> list[str]:
    lines = ["| goal | task | measured | verdict |", "|---|---|---|---|"]
    wins_fedit = wins_local = 0
    for task, arms in stats.items():
        me = arms.get("megace")
        if me is None:
            continue
        if "fedit" in arms:
            d = 100 * (me.personal[0] - arms["fedit"].personal[0])
            wins_fedit += d >= GOAL_MARGIN
            lines.append(f"| megace ≥ FedIT + {GOAL_MARGIN:.0f} points (personalized) | {task} | "
                         f"{_pm(me.personal)} vs {_pm(arms['fedit'].personal)}: {d:+.1f} points | "
                         f"{_verdict(d, me.personal, arms['fedit'].personal, GOAL_MARGIN)} |")
        if "local-only" in arms:
            d = 100 * (me.personal[0] - arms["local-only"].personal[0])
            wins_local += d > 0
            lines.append(f"| megace > local-only (personalized) | {task} | {_pm(me.personal)} vs "
                         f"{_pm(arms['local-only'].personal)}: {d:+.1f} points | "
                         f"{_verdict(d, me.personal, arms['local-only'].personal)} |")
        if "megace-fedavg" in arms:
            ma, fa = me.missing, arms["megace-fedavg"].missing
            d = 100 * (ma[0] - fa[0])
            lines.append(f"| modality-aware > plain averaging, edges missing a modality | {task} | {_pm(ma)} vs "
                         f"{_pm(fa)}: {d:+.1f} points | {_verdict(d, ma, fa)} |")
        lines.append(f"| shared traffic ≤ {TRAFFIC_GOAL}% of parameters per round (measured on the bus) | {task} | "
                     f"{me.upload_pct:.2f}% | {'met' if me.upload_pct <= TRAFFIC_GOAL else '**missed**'} |")
    for r, c in minilm.items():
        pct = 100 * c["shared"] / c["total"]
        lines.append(f"| shared traffic ≤ {TRAFFIC_GOAL}% (MiniLM backbone, rank {r}) | any | {c['shared']:,} of "
                     f"{c['total']:,} = {pct:.2f}% | {'met' if pct <= TRAFFIC_GOAL else '**missed**'} |")
    n = len(stats)
    lines += ["", f"megace beats FedIT by ≥ {GOAL_MARGIN:.0f} points on {wins_fedit} of {n} task(s) and local-only "
                  f"on {wins_local} of {n} (goal: at least two tasks each)."]
    return lines


def render(plan: ExperimentPlan, metrics: list[RunMetrics], stats: dict[str, dict[str, ArmStats]],
           probes: dict[str, Any], broker_kind: str, name: str, note: str = "") -> str:
    from megace.experiment.plan import TASKS

    first = next(iter(TASKS.values()))
    lines = [
        f"# megace experiment{' (quick)' if plan.reduced else ''}"
        f"{f' with the {plan.backbone} backbone' if plan.backbone != 'tiny' else ''}",
        "",
        f"Generated {datetime.now():%Y-%m-%d %H:%M} by `megace experiment{' --quick' if plan.reduced else ''}"
        f"{f' --backbone {plan.backbone}' if plan.backbone != 'tiny' else ''}` "
        f"on a 2-core CPU machine. {len(metrics)} closed-loop runs: tasks {', '.join(plan.tasks)}; seeds "
        f"{', '.join(map(str, plan.seeds))}; {plan.rounds} rounds each.",
        "",
        *([f"> {note}", ""] if note else []),
        "**Set-up (every arm identical except the method).** Each run is the real loop of `megace run`: a "
        f"{'Mosquitto' if broker_kind == 'mosquitto' else 'embedded amqtt'} broker, one cloud aggregator and "
        f"{first.edges} edge agents as separate processes, {first.devices_per_edge} simulated devices per edge "
        "publishing through the device SDK. Dirichlet label skew "
        f"alpha = {first.alpha} across edges (seeded); edge 0 has all modalities, edges 1 and 2 one each; LoRA "
        f"ranks 8/4/2 (FedIT: 8/8/8); {BACKBONE_TEXT[plan.backbone]}; "
        f"{first.steps_per_round} AdamW steps of batch {first.batch_size} per local round; each round the devices "
        f"stream 1/{plan.rounds} of their train data. The seed changes the partition, the augmentation and the "
        "frozen base.",
        "",
        "**Metrics.** *Personalized accuracy*: after the last round, every device sends its own test samples as "
        "inference requests over MQTT; an edge's accuracy is the share of its devices' requests answered "
        "correctly; the table shows the mean over edges (mean ± std over seeds). *Global accuracy*: each edge "
        "answers the whole test set (in its modalities). *Traffic*: adapter bytes edge → cloud seen on the bus per "
        "round (all edges), and the numbers in one upload as % of that edge model's parameters.",
        "",
    ]
    lines += ["## Goals (issue 5)", "", *_goal_lines(stats, probes.get("minilm", {})), ""]
    lines += _reading(stats)
    for task, arms in stats.items():
        lines += [f"## {task}", "",
                  "| arm | what | personalized acc % | global acc % | edges missing a modality, acc % | "
                  "KiB up / round | KiB down / round | upload % of params | runs |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for arm, st in arms.items():
            a = ARM_BY_NAME[arm]
            bold = "**" if a.group == "megace" else ""
            lines.append(
                f"| {bold}{arm}{bold} | {a.title} | {bold}{_pm(st.personal)}{bold} | {_pm(st.global_)} | "
                f"{_pm(st.missing)} | {st.upload_bytes / 1024:.1f} | {st.download_bytes / 1024:.1f} | "
                f"{_pct_cell(st.upload_pct)} | {st.n}{f' ({st.incomplete} incomplete)' if st.incomplete else ''} |")
        edges = sorted({e for st in arms.values() for e in st.per_edge})
        lines += ["", "Per edge, personalized accuracy % (each edge on its own test split):", "",
                  "| arm | " + " | ".join(edges) + " |", "|---" * (len(edges) + 1) + "|"]
        for arm, st in arms.items():
            lines.append(f"| {arm} | " + " | ".join(_pm(st.per_edge.get(e, (math.nan, math.nan))) for e in edges)
                         + " |")
        if task in probes.get("latency", {}):
            fg, inf = probes["latency"][task]
            lines += ["", f"Latency per sample, megace arm, all rounds and seeds (ms; broker: {broker_kind}):", "",
                      "| stage | p50 | p95 |", "|---|---|---|", *_latency_rows(metrics, task, fg, inf)]
        lines.append("")
    lines += [f"![personalized accuracy]({name}-accuracy.png)", "", f"![accuracy per round]({name}-rounds.png)", "",
              f"![traffic]({name}-traffic.png)", ""]
    if probes.get("minilm"):
        lines += ["## Parameter budget with MiniLM", "",
                  "| rank | shared (uploaded) | personal (kept) | total | shared % |", "|---|---|---|---|---|"]
        for r, c in probes["minilm"].items():
            lines.append(f"| {r} | {c['shared']:,} | {c['personal']:,} | {c['total']:,} | "
                         f"{100 * c['shared'] / c['total']:.3f} |")
        lines.append("")
    lines += ["## Notes", "", *NOTES, ""]
    return "\n".join(lines)


def _reading(stats: dict[str, dict[str, ArmStats]]) -> list[str]:
    """Computed facts that frame the verdicts (traffic ratios, best arm), then the hypotheses for misses."""
    out = ["## Reading the results", ""]
    for task, arms in stats.items():
        me, fedit = arms.get("megace"), arms.get("fedit")
        best = max(arms.values(), key=lambda a: a.personal[0])
        facts = [f"best personalized accuracy: **{best.arm}** {_pm(best.personal)}"]
        full = arms.get("fedavg-full")
        if me is not None and full is not None and me.upload_bytes > 0:
            facts.append(f"the full-model FedAvg stand-in sends {full.upload_bytes / me.upload_bytes:.0f}x megace's "
                         "upload traffic")
        if me is not None and fedit is not None and me.upload_bytes > 0:
            facts.append(f"megace uploads {me.upload_bytes / 1024:.0f} KiB per round (all edges) against FedIT's "
                         f"{fedit.upload_bytes / 1024:.0f} KiB ({fedit.upload_bytes / me.upload_bytes:.0f}x less) "
                         f"and receives {me.download_bytes / 1024:.0f} KiB against "
                         f"{fedit.download_bytes / 1024:.0f} KiB")
        out.append(f"* **{task}**: " + "; ".join(facts) + ".")
    out += ["", *WHY_MISSED, ""]
    return out


WHY_MISSED = [
    "Why the accuracy goals are missed (our reading; only the second point was tested):",
    "",
    "* The baselines share *everything* trainable each round: the LoRA factors and also the head, modality "
    "embeddings and cross-modal block (a third of the tiny model's parameters, 5% of MiniLM's; hence their "
    "traffic). With Dirichlet alpha = 0.5 (label skew 0.25-0.31) a model averaged over all edges still suits "
    "each edge's class mix, so FedIT's shared head is an asset here: it learns from every edge's samples, "
    "while megace's personal head learns from its own edge's only (with alpha = 0.5 an edge may hold only a "
    "handful of BasicMotions recordings). BasicMotions is near its ceiling for every federated arm.",
    "* It is not the random tiny backbone: with the pretrained MiniLM backbone (`experiment-minilm.md`) FedIT "
    "still leads megace on digits-av, by about 5 points.",
    "* Not tested here: stronger label skew (alpha 0.1), where a personal head should pay off, and a personal "
    "head initialized from an aggregated one (FedRep/FedBABU-style) instead of trained from the edge's data only.",
    "* Where megace does stand out is traffic: 20-30x less upload than FedIT, within the 0.5% budget with MiniLM.",
]


NOTES = [
    "* FedAvg of the full model is approximated (see `megace/experiment/plan.py`): full-rank LoRA (r = 128 = "
    "hidden size) on every adapted matrix, aggregated with FlexLoRA, which averages ΔW = BA exactly, plus the "
    "head, embeddings and cross-modal block averaged. The frozen base's feed-forward layers are not trained.",
    "* Baselines (FedIT, HetLoRA, FLoRA, FlexLoRA, FedAvg) share everything trainable and have no contrastive "
    "term, as published; megace keeps its personal part (head, embeddings, cross-modal block) at the edge.",
    "* BasicMotions has 40 test recordings in all, so an edge's personal test split holds 4-25 samples: one "
    "sample is 4-25 points of that edge's accuracy. Differences within one standard deviation are noise.",
    "* The traffic goal is about the model a deployment runs: with the tiny test backbone (about 0.43 M "
    "parameters) even a rank-2 adapter is above 0.5%; the MiniLM table shows the same adapters against a 22.7 M "
    "model.",
]


def write_experiment_report(plan: ExperimentPlan, metrics: list[RunMetrics], out: Path, *,
                            broker_kind: str, note: str = "") -> Path:
    from megace.datasets import load_dataset
    from megace.experiment.featuregen import feature_generation_ms
    from megace.experiment.probes import inference_ms, minilm_budget

    out.mkdir(parents=True, exist_ok=True)
    name = plan.name
    stats = _stats(plan, metrics)
    probes: dict[str, Any] = {"latency": {}}
    for task in plan.tasks:
        s = plan.settings(task, "megace", 0).resolved()
        schema, _ = load_dataset(s.dataset, seed=0, max_samples=s.max_samples, **(s.dataset_options or {}))
        probes["latency"][task] = (feature_generation_ms(task), inference_ms(s, schema))
        if "minilm" not in probes:
            probes["minilm"] = minilm_budget(s, schema)
    plot_bars(stats, out / f"{name}-accuracy.png")
    plot_curves(stats, out / f"{name}-rounds.png")
    plot_traffic(stats, out / f"{name}-traffic.png")
    (out / f"{name}.json").write_text(json.dumps(_clean({
        "plan": asdict(plan), "broker": broker_kind,
        "runs": [{k: v for k, v in asdict(m).items() if k != "latency"} for m in metrics],
        "arms": {t: {a: asdict(s) for a, s in arms.items()} for t, arms in stats.items()},
        "probes": {"latency": probes["latency"], "minilm": probes.get("minilm", {})},
    }), indent=1))
    path = out / f"{name}.md"
    path.write_text(render(plan, metrics, stats, probes, broker_kind, name, note))
    return path


def _clean(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x
