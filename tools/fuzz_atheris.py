"""Coverage-guided fuzzing (atheris / libFuzzer) of every decoder and both services' handlers, at volume.

    python tools/fuzz_atheris.py --runs 125000 --jobs 2 --out reports/fuzz/fuzz-atheris.json
    python tools/fuzz_atheris.py --targets envelope,edge --runs 20000

``tools/fuzz.py`` generates structured inputs with hypothesis (about 200 a second on this machine);
this tool feeds the same targets and checks the same properties (``tests/fuzz/targets.py``,
``tests/fuzz/services.py``) from libFuzzer's byte mutations, thousands a second, steered by the
coverage of ``broker``, ``edge_agent`` and ``cloud_aggregator``.  Each target starts from a corpus of
inputs drawn from its hypothesis strategy, serialised as bytes: a payload as it is, a structured
input (a script of ``(topic, payload)`` messages, a body, an array document) as msgpack, which the
target unpacks before the check; bytes that do not unpack are still an input (the unpacker is the
first thing a mutation must get past).  A property violation is recorded (first examples of each
distinct message) and fuzzing goes on.  One child process per target (libFuzzer exits when done),
``--jobs`` at a time; the result JSON sums them, and says per target how many inputs *reached* it
(unpacked into a well-formed script, body or document).  Exit status 1 if anything was violated or a
target did not finish.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TARGETS = ["envelope", "bodies", "arrays", "status", "chunks", "inbox", "edge", "cloud"]
#: inputs drawn from each target's hypothesis strategy to seed its corpus
SEEDS = 300


def _unpack(data: bytes) -> Any:
    import msgpack

    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def _pack(obj: Any) -> bytes:
    import msgpack

    return msgpack.packb(obj, use_bin_type=True)


def adapter(name: str) -> tuple[Callable[[bytes], bool], Callable[[Any], bytes], Any]:
    """(check one byte input, serialise one strategy value, the strategy) for target ``name``.

    The check returns whether the input reached the target (a structured input must unpack first).
    """
    from broker.wire import Kind
    from tests.fuzz import targets as t

    if name in ("envelope", "status"):
        run = t.run_envelope if name == "envelope" else t.run_status
        strat = next(x for x in t.DECODER_TARGETS if x.name == name).strategy()
        return (lambda data: run(data) or True), bytes, strat

    def structured(check: Callable[[Any], None], shape: Callable[[Any], Any]) -> Callable[[bytes], bool]:
        def one(data: bytes) -> bool:
            try:
                value = shape(_unpack(data))
            except Exception:  # not a well-formed input of this target: the unpacker refused it, nothing to check
                return False
            check(value)
            return True

        return one

    def script(*types: type) -> Callable[[Any], list[tuple[Any, ...]]]:
        """Messages as MQTT delivers them: ``(topic: str, payload: bytes[, retained: bool])`` and the like."""

        def shape(obj: Any) -> list[tuple[Any, ...]]:
            def well_formed(m: Any) -> bool:
                return isinstance(m, list) and len(m) == len(types) and all(map(isinstance, m, types))

            if not isinstance(obj, list) or not all(map(well_formed, obj)):
                raise ValueError("not a script")
            return [tuple(m) for m in obj]

        return shape

    if name == "bodies":
        strat = next(x for x in t.DECODER_TARGETS if x.name == name).strategy()
        return (structured(t.run_body, lambda o: (Kind(o[0]), o[1])),
                lambda v: _pack([v[0].value, v[1]]), strat)
    if name == "arrays":
        return structured(t.run_array, lambda o: o), _pack, t.hostile_arrays()
    def lists(v: Any) -> bytes:
        return _pack([list(m) for m in v])

    if name == "chunks":
        return structured(t.run_chunks, script(str, str, object)), lists, t.chunk_script()
    if name == "inbox":
        return structured(t.run_inbox, script(str, bytes)), lists, t.inbox_script()
    from tests.fuzz.services import CloudHarness, EdgeHarness

    if name == "edge":
        edge = EdgeHarness()
        return structured(edge.run, script(str, bytes, bool)), lists, edge.strategy()
    cloud = CloudHarness()
    return structured(cloud.run, script(str, bytes)), lists, cloud.strategy()


def seed_corpus(serialise: Callable[[Any], bytes], strategy: Any, folder: Path, n: int) -> int:
    """Write ``n`` inputs drawn from the target's hypothesis strategy into ``folder``."""
    from hypothesis import HealthCheck, Phase, given, settings

    folder.mkdir(parents=True, exist_ok=True)
    count = [0]

    @settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def draw(value: Any) -> None:
        try:
            data = serialise(value)
        except Exception:  # a value msgpack cannot carry (e.g. a huge int): not a seed
            return
        (folder / f"seed-{count[0]:05d}").write_bytes(data)
        count[0] += 1

    draw()
    return count[0]


def child(name: str, runs: int, result: Path, max_len: int) -> None:
    """Fuzz one target for ``runs`` inputs; libFuzzer exits the process at the end."""
    import atheris

    logging.disable(logging.WARNING)
    # nothing of ours may be imported before this block: only modules first imported inside it are instrumented
    with atheris.instrument_imports(include=["broker", "edge_agent", "cloud_aggregator", "megace_common"]):
        import broker.inbox
        import broker.wire  # noqa: F401
        import cloud_aggregator.core  # noqa: F401
        import edge_agent.core  # noqa: F401
    from tests.fuzz.targets import PropertyViolation
    check, serialise, strategy = adapter(name)
    corpus = Path(tempfile.mkdtemp(prefix=f"megace-fuzz-{name}-"))
    seeds = seed_corpus(serialise, strategy, corpus, SEEDS)
    rec: dict[str, Any] = {"target": name, "inputs": 0, "reached": 0, "violations": 0, "distinct": {}, "seeds": seeds,
                           "started": time.time(), "corpus": str(corpus)}
    last = [0.0]

    def save(final: bool = False) -> None:
        rec["seconds"] = round(time.time() - rec["started"], 1)
        rec["corpus_units"] = sum(1 for _ in corpus.iterdir())
        rec["finished"] = final
        tmp = result.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")
        tmp.replace(result)

    def one(data: bytes) -> None:
        rec["inputs"] += 1
        try:
            rec["reached"] += check(data)
        except PropertyViolation as exc:
            rec["violations"] += 1
            seen = rec["distinct"].setdefault(str(exc)[:200], {"count": 0, "examples": []})
            seen["count"] += 1
            if len(seen["examples"]) < 3:
                seen["examples"].append(base64.b64encode(data[:3000]).decode())
        now = time.time()
        if rec["inputs"] >= runs or now - last[0] > 10:
            last[0] = now
            save(final=rec["inputs"] >= runs)

    atheris.Setup([sys.argv[0], f"-runs={runs}", f"-max_len={max_len}", "-print_final_stats=1", str(corpus)], one)
    atheris.Fuzz()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated subset of {TARGETS}")
    ap.add_argument("--runs", type=int, default=125_000, help="inputs per target")
    ap.add_argument("--jobs", type=int, default=1, help="targets fuzzed at once (one process each)")
    ap.add_argument("--max-len", type=int, default=65_536, help="largest input libFuzzer makes (bytes)")
    ap.add_argument("--out", type=Path, default=None, help="result JSON (default reports/fuzz/atheris-<time>.json)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.runs, args.result, args.max_len)
        return 0
    names = [n for n in args.targets.split(",") if n]
    if unknown := sorted(set(names) - set(TARGETS)):
        ap.error(f"unknown targets {unknown}; choose from {TARGETS}")
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="megace-fuzz-"))

    def run_one(name: str) -> dict[str, Any]:
        result = work / f"{name}.json"
        cmd = [sys.executable, __file__, "--child", name, "--runs", str(args.runs), "--result", str(result),
               "--max-len", str(args.max_len)]
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        rec = json.loads(result.read_text()) if result.exists() else {"target": name, "inputs": 0}
        rec["wall_s"] = round(time.time() - t0, 1)  # with the harness build and the seed corpus
        shutil.rmtree(rec.pop("corpus", ""), ignore_errors=True)  # libFuzzer's finds: megabytes, not kept
        rec["exit_status"] = proc.returncode
        rec["libfuzzer_tail"] = proc.stderr[-600:]
        print(f"{name}: {rec['inputs']} inputs, {rec.get('violations')} violations ({rec.get('seconds')} s)",
              file=sys.stderr, flush=True)
        return rec

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        records = {r["target"]: r for r in pool.map(run_one, names)}
    shutil.rmtree(work, ignore_errors=True)
    crashed = [n for n, r in records.items() if r["exit_status"] != 0 or not r.get("finished")]
    out = args.out or ROOT / "reports" / "fuzz" / f"atheris-{dt.datetime.now(dt.UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    total = sum(r.get("violations", 0) for r in records.values())
    result = {
        "command": "python tools/fuzz_atheris.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "engine": "atheris (libFuzzer), coverage of broker, edge_agent, cloud_aggregator, megace_common",
        "started_utc": dt.datetime.fromtimestamp(started, dt.UTC).isoformat(),
        "duration_s": round(time.time() - started, 1), "runs_per_target": args.runs,
        "inputs_total": sum(r.get("inputs", 0) for r in records.values()),
        "reached_total": sum(r.get("reached", 0) for r in records.values()),
        "internal_errors_total": total, "targets_unfinished": crashed, "targets": records,
        "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "loadavg_at_end": list(os.getloadavg()),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out}: {result['inputs_total']} inputs, {total} violations", file=sys.stderr)
    return 1 if total or crashed else 0


if __name__ == "__main__":
    raise SystemExit(main())
