"""The README's measured figures are exactly what bench/readme_figures.py makes of the committed JSON."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_figures_match_the_committed_benchmark_json(tmp_path: Path) -> None:
    script = ROOT / "bench" / "readme_figures.py"
    ok = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    # the check can fail: a README whose table was edited by hand is caught
    edited = tmp_path / "README.md"
    edited.write_text((ROOT / "README.md").read_text().replace("**0.", "**9.", 1))
    bad = subprocess.run([sys.executable, str(script), "--check", "--readme", str(edited)], capture_output=True,
                         text=True, cwd=ROOT)
    assert bad.returncode == 1 and "differ" in bad.stderr
