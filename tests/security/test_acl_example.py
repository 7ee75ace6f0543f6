"""The ACL example in ``deploy/`` is what ``megace provision`` writes, block for block (it had gone stale once:
status topics without the site, no events, no register request)."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from megace.cli import app

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto" / "acl.template"


def _blocks(text: str) -> dict[str, list[str]]:
    """``# <who>`` comment -> its user/topic lines, for every identity block of an ACL file."""
    out: dict[str, list[str]] = {}
    for block in text.split("\n\n"):
        lines = [ln for ln in block.strip().splitlines() if ln]
        if lines and lines[0].startswith("# ") and len(lines) > 1 and lines[1].startswith("user "):
            out[lines[0]] = lines[1:]
    return out


def test_the_deployed_acl_example_matches_what_provision_generates(tmp_path: Path) -> None:
    runner = CliRunner()
    pki = str(tmp_path / "pki")
    for args in (["init", pki, "--host", "broker.example"],
                 ["site", pki, "site-0", "--edge-id", "e0", "--devices", "gw1"],
                 ["workers", pki, "site-0", "e0", "--count", "1"], ["cloud", pki], ["dashboard", pki, "ops"]):
        result = runner.invoke(app, ["provision", *args])
        assert result.exit_code == 0, result.output
    generated = _blocks((tmp_path / "pki" / "broker" / "megace.acl").read_text())
    example = _blocks(EXAMPLE.read_text())
    assert set(example) == {"# device gw1 (site site-0)", "# edge e0 (site site-0)",
                            "# control e0 (site site-0)", "# infer e0-w1 (site site-0)",
                            "# cloud cloud", "# dashboard ops"}
    assert example == generated
