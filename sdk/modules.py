"""Which of this repository's modules the device SDK needs: ``device_sdk`` and what it imports, transitively.

Why a walk and not a list: the ``megace-device-sdk`` wheel (``sdk/pyproject.toml``) must ship exactly
these modules, and they must run on Python 3.9; both are checked in the tests against this walk, so
a new import in the SDK cannot leave the wheel short or pull unchecked code onto gateways.

The walk reads source (``ast``), so it sees imports inside functions too (``import`` at call time
still needs the module on the gateway) and imports nothing. Imports under ``if TYPE_CHECKING:``
are skipped: they never run. Run ``python sdk/modules.py`` to print the ``py-modules`` list for
``sdk/pyproject.toml``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
"""The repository root (``sdk/`` sits in it)."""

ENTRY = "device_sdk"


def module_path(name: str, root: Path = ROOT) -> Path | None:
    """The file of module or package ``name`` in ``root``, or None if it is not this repository's."""
    base = root.joinpath(*name.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported_names(tree: ast.Module, module: str, is_package: bool) -> list[str]:
    """Absolute dotted names ``tree`` imports (for ``from a import b``: ``a`` and ``a.b``), at any depth."""
    package = module if is_package else module.rpartition(".")[0]
    names: list[str] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)  # the body never runs; an else branch does
            continue
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            names.append(source)
            names.extend(f"{source}.{alias.name}" for alias in node.names if alias.name != "*")
        stack.extend(ast.iter_child_nodes(node))
    return names


def sdk_modules(root: Path = ROOT, entry: str = ENTRY) -> dict[str, Path]:
    """Every module of ``root`` that ``entry`` (all of its files) imports, transitively: name -> file.

    Parent packages are included (importing ``a.b`` runs ``a/__init__.py``), and so is every module of
    the ``entry`` package itself and of its subpackages.
    """
    entry_dir = root / entry
    # subpackages too (device_sdk.extractors): optional parts ship in the wheel even though nothing imports them
    todo = [".".join((entry, *p.relative_to(entry_dir).with_suffix("").parts)).removesuffix(".__init__")
            for p in sorted(entry_dir.rglob("*.py"))]
    found: dict[str, Path] = {}
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # a.b.c also runs a and a.b
            prefix = ".".join(parts[:i])
            path = module_path(prefix, root)
            if path is None or prefix in found:
                continue
            found[prefix] = path
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            todo.extend(_imported_names(tree, prefix, path.name == "__init__.py"))
    return dict(sorted(found.items()))


def py_modules_toml(modules: dict[str, Path]) -> str:
    """The ``py-modules`` array for ``sdk/pyproject.toml`` (packages' ``__init__`` come with their modules)."""
    names = [n for n, p in modules.items() if p.name != "__init__.py" or not any(
        m.startswith(n + ".") for m in modules)]
    return "py-modules = [\n" + "".join(f'    "{n}",\n' for n in names) + "]"


if __name__ == "__main__":
    found = sdk_modules()
    for name, path in found.items():
        print(f"{name:28} {path.relative_to(ROOT)}", file=sys.stderr)
    print(py_modules_toml(found))
