"""The ``megace`` command line: every command documents itself, bad options are refused before anything starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from megace.cli import app

runner = CliRunner()


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("run", ["--dataset", "--edges", "--devices-per-edge", "--rounds", "--strategy", "--alpha", "--backbone",
                 "--broker", "--ca-file", "--username", "--password", "--out"]),
        ("experiment", ["--quick", "--seeds", "--tasks", "--arms", "--out"]),
        ("edge", ["--config"]),
        ("cloud", ["--config"]),
        ("broker", ["--port", "--host"]),
    ],
)
def test_help_of_each_command(command: str, expected: list[str]) -> None:
    result = runner.invoke(app, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for option in expected:
        assert option in result.output, (command, option)


def test_top_level_help_lists_commands() -> None:
    result = runner.invoke(app, ["--help"], terminal_width=200)
    assert result.exit_code == 0
    for command in ("run", "experiment", "edge", "cloud", "broker"):
        assert command in result.output


def test_python_dash_m_is_the_same_cli() -> None:
    out = subprocess.run([sys.executable, "-m", "megace", "run", "--help"], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert "--strategy" in out.stdout


def test_run_offers_every_rule_the_cloud_knows() -> None:
    from cloud_aggregator.strategies import STRATEGIES as REGISTRY
    from megace.cli import STRATEGIES

    assert sorted(STRATEGIES) == sorted(REGISTRY)
    result = runner.invoke(app, ["run", "--help"], terminal_width=400)
    for name in REGISTRY:
        assert name in result.output, name


@pytest.mark.parametrize(("args", "message"), [
    (["run", "--strategy", "krum"], "strategy"),
    (["run", "--backbone", "bert-large"], "backbone"),
    (["run", "--ranks", "8,x"], "ranks"),
    (["run", "--edges", "0"], "edges"),
])
def test_bad_options_are_refused(args: list[str], message: str) -> None:
    result = runner.invoke(app, args, terminal_width=200)
    assert result.exit_code != 0
    assert message in result.output.lower()


def test_edge_with_a_missing_config_fails_cleanly(tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = runner.invoke(app, ["edge", "--config", str(tmp_path / "absent.toml")])
    assert result.exit_code == 2


def test_cloud_ledger_option_reaches_the_config(capfd: pytest.CaptureFixture[str]) -> None:
    """``megace cloud --ledger`` overrides ``[ledger] url``: a URL that is neither empty nor PostgreSQL is refused
    by the config's validation (exit 2) before anything connects; the example config alone is valid."""
    example = str(Path(__file__).resolve().parents[2] / "deploy" / "cloud.example.toml")
    result = runner.invoke(app, ["cloud", "--config", example, "--ledger", "mysql://db/megace"])
    assert result.exit_code == 2
    assert "ledger.url must be empty" in result.output + capfd.readouterr().err
