"""Dependencies flow one way: no package imports from a layer above its own.

Lowest first: the bus contract (``broker``), then ``device_sdk`` and the shared helpers
(``megace_common``), then the shared model description (``megace_model``: the multimodal base
model and its LoRA adapters, which edge and cloud both build), then the services (``edge_agent``,
``cloud_aggregator``), then the operator's package (``megace``: CLI, closed loop, experiments).
Read from the source with ``ast``, so a lazy import inside a function counts as much as one at
the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIRST_PARTY = {"broker", "device_sdk", "megace_common", "megace_model", "edge_agent", "cloud_aggregator", "megace"}
ALLOWED: dict[str, set[str]] = {
    "broker": {"broker"},
    "device_sdk": {"device_sdk", "broker"},
    "megace_common": {"megace_common", "broker"},
    "megace_model": {"megace_model", "megace_common", "broker"},
    "edge_agent": {"edge_agent", "megace_model", "megace_common", "broker"},
    "cloud_aggregator": {"cloud_aggregator", "megace_model", "megace_common", "broker"},
}


def first_party_imports(path: Path, root: Path = ROOT) -> set[str]:
    """Dotted names of the first-party modules that ``path`` imports (relative imports resolved)."""
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names = [base]
        else:
            continue
        out.update(n for n in names if n.split(".")[0] in FIRST_PARTY)
    return out


def violations(layer: str, root: Path = ROOT) -> list[str]:
    allowed = ALLOWED[layer]
    bad = []
    for path in sorted((root / layer).rglob("*.py")):
        for name in sorted(first_party_imports(path, root)):
            if not any(name == a or name.startswith(a + ".") for a in allowed):
                bad.append(f"{path.relative_to(root)} imports {name}")
    return bad


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_no_import_from_a_higher_or_sideways_layer(layer: str) -> None:
    assert (ROOT / layer / "__init__.py").is_file()
    assert violations(layer) == []


def test_the_checker_sees_relative_lazy_and_dotted_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "edge_agent" / "sub"
    pkg.mkdir(parents=True)
    (pkg / "mod.py").write_text(
        "import json\nfrom .. import config\nfrom ..model import x\n"
        "def f():\n    import megace.cli\n    from cloud_aggregator.core import AggregatorCore\n"
    )
    assert first_party_imports(pkg / "mod.py", tmp_path) == {
        "edge_agent", "edge_agent.model", "megace.cli", "cloud_aggregator.core"}
    assert violations("edge_agent", tmp_path) == [
        "edge_agent/sub/mod.py imports cloud_aggregator.core", "edge_agent/sub/mod.py imports megace.cli"]
