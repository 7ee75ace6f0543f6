"""The device SDK runs on the gateways' Python 3.9: checked with vermin, and with real 3.9/3.10 where installed.

Only Python 3.11 runs the suite, so what gateways run is checked three ways over exactly the SDK's
modules (``sdk/modules.py`` walks its imports; a fresh interpreter's ``sys.modules`` must agree):
vermin finds no construct newer than 3.9 (annotations aside: every module defers them with
``from __future__ import annotations``, so they never run), the checks are shown to fail on planted
3.10/3.11 code, and where a 3.9 or 3.10 interpreter is installed (pyenv) it compiles every module and
runs the standard-library-only ones, which must behave exactly as they do here.
"""

from __future__ import annotations

import ast
import copy
import glob
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import FrozenInstanceError, dataclass, field, replace
from pathlib import Path

import pytest
import vermin

from broker.compat import StrEnum, add_slots, slotted_dataclass
from sdk.modules import ROOT, sdk_modules

TARGET = (3, 9)
FORBIDDEN = ("torch", "transformers", "peft", "onnxruntime", "aiomqtt", "amqtt", "safetensors", "cryptography",
             "megace_model", "megace_common", "edge_agent", "cloud_aggregator", "megace")
"""Top-level packages that ``import device_sdk`` must not load (cryptography only once a key is given)."""


def version_report(path: Path, source: str | None = None) -> tuple[tuple[int, int], list[str]]:
    """The minimum Python 3 version vermin finds for a module, and the findings that need more than 3.9.

    Annotations are removed before the analysis (they never run, see :func:`defers_annotations`), which
    lets vermin's ``union-types`` rule flag every other ``X | Y`` of types, such as ``isinstance(x, A | B)``.
    ``# novermin`` comments are honoured (line numbers are kept)."""
    text = path.read_text(encoding="utf-8") if source is None else source
    config = vermin.Config()
    config.enable_feature("union-types")
    config.set_verbose(3)
    tree, novermin = vermin.Parser(text, str(path)).parse(config.parse_comments())
    for node in ast.walk(tree):
        if isinstance(node, ast.arg):
            node.annotation = None
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            node.returns = None
        elif isinstance(node, ast.AnnAssign):
            node.annotation = ast.copy_location(ast.Constant(None), node.annotation)
    visitor = vermin.SourceVisitor(config=config, path=str(path), source=text)
    visitor.set_no_lines(novermin)
    visitor.tour(tree)
    needed = visitor.minimum_versions()[1] or (3, 0)
    too_new = [line for line in visitor.output_text().splitlines()
               if " require" in line and _version_in(line) > TARGET]
    return tuple(needed[:2]), too_new  # type: ignore[return-value]


def _version_in(line: str) -> tuple[int, ...]:
    """The Python 3 version at the end of a vermin finding such as ``L4: 'zip(strict)' requires !2, 3.10``."""
    py3 = line.rsplit(",", 1)[-1].strip()
    return (99,) if py3.startswith("!") else tuple(int(p) for p in py3.split("."))  # !3: no Python 3 at all


def defers_annotations(source: str) -> bool:
    """True if the module has no annotations or postpones them all (``from __future__ import annotations``)."""
    tree = ast.parse(source)
    future = any(isinstance(n, ast.ImportFrom) and n.module == "__future__" and
                 any(a.name == "annotations" for a in n.names) for n in tree.body)
    annotated = any(isinstance(n, ast.AnnAssign) or (isinstance(n, ast.arg) and n.annotation is not None) or
                    (isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.returns is not None)
                    for n in ast.walk(tree))
    return future or not annotated


SDK = sdk_modules()


def test_the_walk_covers_what_importing_the_sdk_loads_and_nothing_heavy_comes_with_it() -> None:
    code = ("import json, sys; import device_sdk; print(json.dumps("
            "{n: getattr(m, '__file__', None) for n, m in sys.modules.items()}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    loaded: dict[str, str | None] = json.loads(out.stdout)
    venv = Path(sys.prefix).resolve()
    ours = {n for n, f in loaded.items() if f and Path(f).resolve().is_relative_to(ROOT)
            and not Path(f).resolve().is_relative_to(venv)}
    assert {"device_sdk", "device_sdk.client", "broker.wire.envelope", "broker.compat"} <= ours
    assert ours <= set(SDK), f"loaded but not found by sdk/modules.py: {sorted(ours - set(SDK))}"
    heavy = sorted(n for n in loaded if n.split(".")[0] in FORBIDDEN)
    assert heavy == [], f"import device_sdk loaded {heavy}"


def test_every_sdk_module_needs_at_most_python_3_9() -> None:
    assert len(SDK) >= 20, sorted(SDK)  # device_sdk and the bus contract it uses, not an empty walk
    report = {name: version_report(path) for name, path in SDK.items()}
    too_new = {name: findings for name, (_, findings) in report.items() if findings}
    assert too_new == {}, json.dumps(too_new, indent=1)
    assert max(needed for needed, _ in report.values()) <= TARGET


def test_every_sdk_module_defers_its_annotations() -> None:
    eager = [name for name, path in SDK.items() if not defers_annotations(path.read_text(encoding="utf-8"))]
    assert eager == [], f"annotations evaluated at import (add `from __future__ import annotations`): {eager}"


PLANTS = {
    "match": "\ndef _plant(x):\n    match x:\n        case [a, b]:\n            return a\n    return None\n",
    "zip_strict": "\ndef _plant(a, b):\n    return list(zip(a, b, strict=True))\n",
    "union_isinstance": "\ndef _plant(x):\n    return isinstance(x, int | str)\n",
    "union_alias": "\n_Plant = dict | None\n",
    "strenum": "\nfrom enum import StrEnum as _Plant\n",
    "dataclass_slots": "\nimport dataclasses\n@dataclasses.dataclass(slots=True)\nclass _Plant:\n    x: int\n",
    "kw_only": "\nimport dataclasses\n@dataclasses.dataclass(kw_only=True)\nclass _Plant:\n    x: int\n",
    "utc": "\nimport datetime\n_PLANT = datetime.UTC\n",
    "tomllib": "\nimport tomllib\n",
    "typing_self": "\nfrom typing import Self\n",
    "except_star": "\ntry:\n    pass\nexcept* ValueError:\n    pass\n",
}


@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_the_check_fails_on_newer_code_planted_in_an_sdk_module(plant: str) -> None:
    path = SDK["device_sdk.store"]
    clean = path.read_text(encoding="utf-8")
    assert version_report(path, clean)[1] == []
    needed, findings = version_report(path, clean + PLANTS[plant])
    assert needed > TARGET and findings, f"{plant}: vermin saw {needed}, {findings}"


def test_the_annotation_check_fails_on_a_module_that_evaluates_them() -> None:
    source = SDK["broker.metrics"].read_text(encoding="utf-8")
    assert defers_annotations(source)
    eager = source.replace("from __future__ import annotations\n", "")
    assert not defers_annotations(eager)


# -- the compatibility layer behaves like what it replaces ------------------------------------------------


def test_strenum_prints_formats_and_compares_like_enum_strenum() -> None:
    import enum

    native = enum.StrEnum("Native", {"A": "alpha", "B": "beta"})  # novermin: the reference, 3.11 here
    ours = StrEnum("Ours", {"A": "alpha", "B": "beta"})
    for n, o in zip(native, ours, strict=True):
        assert (str(o), f"{o}", format(o, ">8"), o.value, o == o.value, hash(o)) == \
               (str(n), f"{n}", format(n, ">8"), n.value, n == n.value, hash(n))
        assert repr(o) == repr(n).replace("Native", "Ours") and isinstance(o, str)
    assert ours("beta") is ours.B and str(ours.B) == "beta"


def _point(decorate: Callable[[type], type]) -> type:
    """A fresh dataclass with a plain default, a factory default and a method, made by ``decorate``."""

    @decorate
    class Point:
        x: int
        y: int = 2
        tags: list[str] = field(default_factory=list)

        def norm(self) -> int:
            return abs(self.x) + abs(self.y)

    return Point


def _rebuild_py39(frozen: bool) -> Callable[[type], type]:
    """What ``slotted_dataclass`` does on Python 3.9, run here so that path is tested too."""
    return lambda cls: add_slots(dataclass(frozen=frozen)(cls), frozen=frozen)


@pytest.mark.parametrize("how", ["slotted_dataclass", "py39-rebuild"])
@pytest.mark.parametrize("frozen", [False, True], ids=["mutable", "frozen"])
def test_slotted_dataclasses_have_slots_and_keep_dataclass_behaviour(how: str, frozen: bool) -> None:
    cls = _point(slotted_dataclass(frozen=frozen) if how == "slotted_dataclass" else _rebuild_py39(frozen))
    p = cls(1)
    assert cls.__slots__ == ("x", "y", "tags") and not hasattr(p, "__dict__")
    assert (p.x, p.y, p.tags, p.norm(), repr(p)) == (1, 2, [], 3, "_point.<locals>.Point(x=1, y=2, tags=[])")
    assert p == cls(1, 2, []) and p != cls(1, 3) and cls(1).tags is not p.tags
    assert copy.copy(p) == p and copy.deepcopy(p) == p  # __getstate__/__setstate__, as pickle uses them
    assert replace(p, y=5) == cls(1, 5)
    with pytest.raises((AttributeError, TypeError)):
        p.z = 1
    if frozen:
        with pytest.raises(FrozenInstanceError):
            p.x = 5
    else:
        p.x = 5
        assert p.norm() == 7


# -- real Python 3.9 and 3.10, where installed ------------------------------------------------------------

PROBE = r"""
import json, pickle, sys
sys.path.insert(0, sys.argv[1])
files = json.loads(sys.argv[2])
for f in files:  # syntax: every module compiles
    compile(open(f, encoding="utf-8").read(), f, "exec", dont_inherit=True)
imported, missing = [], []
import importlib
for name in json.loads(sys.argv[3]):
    try:
        importlib.import_module(name)
        imported.append(name)
    except ModuleNotFoundError as exc:  # paho, msgpack, numpy are not installed in that interpreter
        if exc.name.split(".")[0] not in ("paho", "msgpack", "numpy"):
            raise
        missing.append(name)
from broker import topics
from broker.address import BrokerAddress
enums = {e.__name__: [[str(m), f"{m}", repr(m), m.value, type(m)(m.value) is m] for m in e]
         for e in (topics.Uplink, topics.Downlink, topics.Role, topics.Channel)}
parsed = []
for t in ["megace/v1/site/s/device/d/up/features", "megace/v1/site/s/device/d/down/prediction/chunk/7",
          "megace/v1/cloud/up/s/adapter", "megace/v1/cloud/down/global", "megace/v1/cloud/down/site/s/feedback",
          "megace/v1/status/edge/e1", "megace/v1/metrics/device/d", "megace/v1/site/s/device/d/up/nope",
          "megace/v1/status/nobody/x", "megace/v1/cloud/down/site/s", "megace/v2/status/edge/e1"]:
    try:
        p = topics.parse(t)
        parsed.append([repr(p), p.base, hasattr(p, "__dict__")])
    except Exception as exc:
        parsed.append([type(exc).__name__, str(exc)])
a = BrokerAddress.from_url("mqtts://u:p%40ss@h:8883?ca=/c.pem&keepalive=9", env={})
try:
    a.host = "x"
    frozen = "assigned"
except Exception as exc:
    frozen = type(exc).__name__
print(json.dumps({"imported": imported, "missing": missing, "enums": enums, "parsed": parsed,
                  "address": [repr(a), a.url(with_password=True), pickle.loads(pickle.dumps(a)) == a, frozen]}))
"""


def _python(minor: int) -> str | None:
    """A working ``python3.<minor>``: on PATH, or in pyenv's versions (this machine's kind has them)."""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    for exe in [shutil.which(f"python3.{minor}"), *sorted(glob.glob(str(pyenv / f"versions/3.{minor}.*/bin/python3")))]:
        if exe and subprocess.run([exe, "-c", f"import sys; assert sys.version_info[:2] == (3, {minor})"],
                                  capture_output=True, timeout=30).returncode == 0:
            return exe
    return None


def _probe(python: str) -> dict[str, object]:
    files = [str(p) for p in SDK.values()]
    out = subprocess.run([python, "-I", "-B", "-c", PROBE, str(ROOT), json.dumps(files), json.dumps(sorted(SDK))],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


@pytest.mark.parametrize("minor", [9, 10])
def test_sdk_compiles_on_real_python_and_its_stdlib_only_modules_behave_as_here(minor: int) -> None:
    python = _python(minor)
    if python is None:
        pytest.skip(f"no Python 3.{minor} interpreter here (pyenv or PATH)")
    there, here = _probe(python), _probe(sys.executable)
    assert {"broker.compat", "broker.topics", "broker.address", "broker.errors"} <= set(there["imported"])
    assert set(there["imported"]) | set(there["missing"]) == set(SDK)
    assert here["missing"] == []
    for key in ("enums", "parsed", "address"):
        assert there[key] == here[key], key
