"""Long fuzz run over every bus decoder and the services' network-free handlers; writes a JSON result.

    python tools/fuzz.py --examples 1000000 > reports/fuzz/run.log 2>&1
    python tools/fuzz.py --examples 20000 --targets envelope,edge --seconds 300

``--examples`` is the total number of generated inputs across the chosen targets (split evenly; a
script target's input is a short sequence of messages, counted once). Targets: envelope, bodies, arrays,
status, chunks, inbox (decoders: only ``WireError`` may escape), edge (``EdgeCore.ingest``: never raises,
never counts ``internal_errors``, a rejected message changes no state) and cloud
(``AggregatorCore.ingest``: never raises). Inputs come from ``tests/fuzz/strategies.py``, the same
strategies the short runs in ``tests/fuzz`` use. Unlike those, a violation does not stop the run: it is
recorded (first examples of each distinct message) and generation goes on. The result
(``reports/fuzz/fuzz-<UTC time>.json`` unless ``--out``) holds the command, duration, inputs per target
and every violation found; the exit status is 1 if there was any.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hypothesis import HealthCheck, Phase, Verbosity, given, settings  # noqa: E402

from tests.fuzz.targets import DECODER_TARGETS, PropertyViolation, Target  # noqa: E402

ALL = [t.name for t in DECODER_TARGETS] + ["edge", "cloud"]


def build(names: list[str]) -> list[Target]:
    targets = [t for t in DECODER_TARGETS if t.name in names]
    if "edge" in names or "cloud" in names:
        from tests.fuzz.services import CloudHarness, EdgeHarness, service_target

        if "edge" in names:
            targets.append(service_target("edge", EdgeHarness()))
        if "cloud" in names:
            targets.append(service_target("cloud", CloudHarness()))
    return targets


def run_batch(target: Target, n: int, record: dict[str, Any]) -> None:
    """``n`` generated inputs through ``target``; violations are recorded, not raised."""

    @settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate], verbosity=Verbosity.quiet,
              suppress_health_check=list(HealthCheck))
    @given(target.strategy())
    def one(value: Any) -> None:
        record["inputs"] += 1
        try:
            target.run(value)
        except PropertyViolation as exc:
            record["violations"] += 1
            key = str(exc)[:200]
            seen = record["distinct"].setdefault(key, {"count": 0, "examples": []})
            seen["count"] += 1
            if len(seen["examples"]) < 3:
                seen["examples"].append(repr(value)[:2000])

    one()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=100_000, help="total inputs across targets")
    ap.add_argument("--targets", default=",".join(ALL), help=f"comma-separated subset of {ALL}")
    ap.add_argument("--seconds", type=float, default=0.0, help="stop after this long (0: no limit)")
    ap.add_argument("--batch", type=int, default=2000, help="inputs per hypothesis run (round-robin unit)")
    ap.add_argument("--out", type=Path, default=None, help="result JSON (default reports/fuzz/fuzz-<time>.json)")
    args = ap.parse_args(argv)
    names = [n for n in args.targets.split(",") if n]
    unknown = sorted(set(names) - set(ALL))
    if unknown:
        ap.error(f"unknown targets {unknown}; choose from {ALL}")
    logging.disable(logging.WARNING)  # every rejection is logged (rate-limited); internal errors still show
    started = time.time()
    targets = build(names)
    per_target = max(1, args.examples // len(targets))
    records = {t.name: {"inputs": 0, "violations": 0, "seconds": 0.0, "distinct": {}} for t in targets}
    out = args.out or ROOT / "reports" / "fuzz" / f"fuzz-{dt.datetime.now(dt.UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    deadline = started + args.seconds if args.seconds else float("inf")

    def write(finished: bool) -> None:
        result = {
            "command": "python tools/fuzz.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "finished": finished, "started_utc": dt.datetime.fromtimestamp(started, dt.UTC).isoformat(),
            "duration_s": round(time.time() - started, 1), "examples_requested": args.examples,
            "inputs_total": sum(r["inputs"] for r in records.values()),
            "internal_errors_total": sum(r["violations"] for r in records.values()),
            "targets": records, "python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "loadavg_at_end": list(os.getloadavg()),
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
        tmp.replace(out)

    active = list(targets)
    while active and time.time() < deadline:
        for target in list(active):
            rec = records[target.name]
            n = min(args.batch, per_target - rec["inputs"])
            if n <= 0 or time.time() >= deadline:
                active.remove(target)
                continue
            t0, before = time.time(), rec["inputs"]
            run_batch(target, n, rec)
            rec["seconds"] = round(rec["seconds"] + time.time() - t0, 2)
            if rec["inputs"] == before:  # hypothesis found nothing more to generate
                active.remove(target)
            print(f"{target.name}: {rec['inputs']} inputs, {rec['violations']} violations", file=sys.stderr,
                  flush=True)
        write(finished=False)
    write(finished=True)
    total = sum(r["violations"] for r in records.values())
    print(f"wrote {out}: {sum(r['inputs'] for r in records.values())} inputs, {total} violations", file=sys.stderr)
    return 1 if total else 0


if __name__ == "__main__":
    raise SystemExit(main())
