"""What the edge and cloud config files share: environment overrides and writing TOML back.

Both services read TOML, then ``MEGACE_<ROLE>__<SECTION>__<KEY>=value`` variables, then explicit
overrides; the closed-loop launcher writes config files that must read back to equal configs.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from typing import Any


def parse_env_value(raw: str) -> Any:
    """A TOML value if ``raw`` is one (``3``, ``true``, ``[1, 2]``), else the plain string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def env_paths(prefix: str, environ: Mapping[str, str]) -> list[tuple[list[str], Any]]:
    """``(["section", "key"], value)`` for every ``<prefix>SECTION__KEY`` variable, keys lower-cased, sorted."""
    out = []
    for name in sorted(environ):
        if name.startswith(prefix):
            path = [p.lower() for p in name[len(prefix) :].split("__") if p]
            if path:
                out.append((path, parse_env_value(environ[name])))
    return out


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return ("-" if v < 0 else "") + ("inf" if math.isinf(v) else "nan")
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items() if x is not None) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _key(k: str) -> str:
    return k if k and all(c.isalnum() or c in "_-" for c in k) else _value(k)


def dump_toml(data: Mapping[str, Any], prefix: str = "") -> str:
    """Scalars first, then one ``[table]`` per nested mapping; ``None`` (no TOML null) is left out."""
    lines = [f"{_key(k)} = {_value(v)}" for k, v in data.items() if v is not None and not isinstance(v, Mapping)]
    out = "\n".join(lines) + ("\n" if lines else "")
    for k, v in data.items():
        if isinstance(v, Mapping):
            name = f"{prefix}{_key(k)}"
            scalars = any(not isinstance(x, Mapping) for x in v.values()) or not v
            out += ("\n" if out else "") + (f"[{name}]\n" if scalars else "") + dump_toml(v, name + ".")
    return out
