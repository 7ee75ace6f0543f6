"""What the edge and cloud config files share: the layering, environment overrides, writing TOML back.

Both services read TOML, then ``MEGACE_<ROLE>__<SECTION>__<KEY>=value`` variables, then explicit
overrides (:func:`load_layers`); the closed-loop launcher writes config files that must read back
to equal configs (:func:`dump_toml`).
"""

from __future__ import annotations

import copy
import math
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: tables that an override replaces whole instead of merging key by key: a modality set is given complete
WHOLE_TABLES = frozenset({"modalities"})


def load_layers(
    path: str | os.PathLike[str] | None,
    env_prefix: str,
    overrides: Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    error: type[Exception] = ValueError,
    what: str = "config",
) -> dict[str, Any]:
    """The nested dict a service's ``from_dict`` builds its config from; later layers win.

    1. the TOML file ``path`` (none when ``None``); unreadable: ``error("cannot read <what> <path>: ...")``;
    2. every ``<env_prefix>SECTION__KEY=value`` variable of ``environ`` (default ``os.environ``)
       sets that one key (:func:`env_paths`);
    3. each ``overrides`` item in order: a dotted key (``"aggregation.buffer_k"``) sets that one key,
       a table is merged key by key (:func:`deep_merge`), anything else replaces.

    Setting a key below a value that is not a table raises ``error``.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise error(f"cannot read {what} {Path(path)}: {exc}") from exc
    for parts, value in env_paths(env_prefix, os.environ if environ is None else environ):
        set_path(data, parts, value, error)
    for key, value in (overrides or {}).items():
        value = copy.deepcopy(value)
        if "." in key:
            set_path(data, key.split("."), value, error)
        elif isinstance(value, Mapping) and isinstance(data.get(key), Mapping) and key not in WHOLE_TABLES:
            data[key] = deep_merge(data[key], value)
        else:
            data[key] = value
    return data


def deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated with ``extra``, tables merged key by key (``WHOLE_TABLES`` are replaced whole)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) and key not in WHOLE_TABLES:
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def set_path(data: dict[str, Any], parts: list[str], value: Any, error: type[Exception] = ValueError) -> None:
    """``data[parts[0]][parts[1]]... = value``, creating tables on the way; a non-table on the way raises ``error``."""
    node = data
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise error(f"{'.'.join(parts)}: {p} is not a table")
        node = nxt
    node[parts[-1]] = value


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
