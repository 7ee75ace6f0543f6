"""Hypothesis strategies for hostile bus input: raw bytes, junk msgpack, and valid messages with a few
fields broken.

Random bytes alone almost never get past msgpack; the useful inputs are *nearly* valid, so most
strategies here start from a real message (a template) and mutate a few places in it: a value swapped
for junk (huge ints, NaN, nested lists, wrong types), a key dropped or added, an array's shape or dtype
bent. Shared by the short runs in ``tests/fuzz`` and the long run in ``tools/fuzz.py``.
"""

from __future__ import annotations

import copy
from typing import Any

import msgpack
import numpy as np
from hypothesis import strategies as st

from broker import topics
from broker.wire.arrays import DTYPES
from broker.wire.envelope import Kind, content_type

INT_EDGES = [0, 1, -1, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1, -(2**63)]
FLOAT_EDGES = [0.0, -0.0, 1e300, -1e300, 3.5e38, 3.4028235e38, 1e-320, float("nan"), float("inf"), float("-inf")]

ints = st.one_of(st.sampled_from(INT_EDGES), st.integers(-(2**63), 2**64 - 1), st.integers(-3, 70))
floats = st.one_of(st.sampled_from(FLOAT_EDGES), st.floats(allow_nan=True, allow_infinity=True))
texts = st.one_of(st.sampled_from(["", "imu", "env", "audio", "IMU", "a" * 40, "x.lora_B.weight", "<f4", "<f8",
                                   "|O", "V8", "S3", ">f4", "float32", "M8[s]", "\x00", "é"]),
                  st.text(max_size=12))
scalars = st.one_of(st.none(), st.booleans(), ints, floats, texts, st.binary(max_size=24))
junk = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.one_of(texts, ints), inner, max_size=4)),
    max_leaves=12,
)
"""Any msgpack-representable value, biased to the edges (64-bit limits, non-finite floats, odd strings)."""


def plain(obj: Any) -> Any:
    """``obj`` as a receiver sees it after msgpack (memoryviews become bytes, tuples lists)."""
    return msgpack.unpackb(msgpack.packb(obj, use_bin_type=True), raw=False, strict_map_key=False)


def pack(obj: Any) -> bytes:
    """msgpack the way senders do; ints beyond 64 bits cannot be packed, so they become strings."""
    try:
        return msgpack.packb(obj, use_bin_type=True)
    except (OverflowError, TypeError, ValueError):
        return msgpack.packb(repr(obj), use_bin_type=True)


@st.composite
def hostile_arrays(draw: st.DrawFn) -> Any:
    """A wire array map with any mix of wrong dtype, shape and byte length (or just junk)."""
    if draw(st.integers(0, 9)) == 0:
        return draw(junk)
    dtype = draw(st.one_of(st.sampled_from(sorted(DTYPES)), texts, junk))
    dim = st.one_of(st.integers(0, 6), st.sampled_from(INT_EDGES), junk)
    shape = draw(st.one_of(st.lists(dim, max_size=10), junk))
    itemsize = DTYPES[dtype].itemsize if isinstance(dtype, str) and dtype in DTYPES else 4
    n = 1
    if isinstance(shape, list) and all(type(d) is int and 0 <= d < 1000 for d in shape):
        for d in shape:
            n *= d
    size = draw(st.one_of(st.just(min(n * itemsize, 4096)), st.integers(0, 64)))
    filler = draw(st.sampled_from([b"\x00", b"\xff", b"\x7f\x7f\x7f\x7f", b"\x00\x00\xc0\x7f", b"\x01"]))
    data = draw(st.one_of(st.just((filler * size)[:size]), junk)) if draw(st.integers(0, 5)) == 0 else (
        (filler * size)[:size])
    arr: dict[Any, Any] = {"dtype": dtype, "shape": shape, "data": data}
    if draw(st.integers(0, 9)) == 0:
        arr[draw(texts)] = draw(junk)
    return arr


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def _set(obj: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return obj


@st.composite
def mutated(draw: st.DrawFn, template: Any, max_mutations: int = 3) -> Any:
    """``template`` (deep-copied) with 0..max_mutations places replaced, removed or added."""
    obj = copy.deepcopy(template)
    for _ in range(draw(st.integers(0, max_mutations))):
        paths = _paths(obj)
        path = draw(st.sampled_from(paths))
        op = draw(st.integers(0, 6))
        if op <= 1:
            obj = _set(obj, path, draw(junk))
        elif op == 2:
            obj = _set(obj, path, draw(hostile_arrays()))
        elif op == 3 and path:  # drop the key / item
            parent = obj
            for key in path[:-1]:
                parent = parent[key]
            if isinstance(parent, dict):
                parent.pop(path[-1], None)
            elif isinstance(parent, list) and parent:
                parent.pop()
        elif op == 4:  # add a key next to the path
            target = obj
            for key in path:
                target = target[key]
            if isinstance(target, dict):
                target[draw(st.one_of(texts, ints))] = draw(junk)
            elif isinstance(target, list):
                target.append(draw(junk))
        elif op == 5 and path and isinstance(_get(obj, path), bytes):  # array payload: same length, odd values
            old = _get(obj, path)
            pattern = draw(st.sampled_from(VALUE_PATTERNS))
            obj = _set(obj, path, (pattern * (len(old) // len(pattern) + 1))[: len(old)])
        else:  # a number nudged to a limit
            obj = _set(obj, path, draw(st.one_of(st.sampled_from(INT_EDGES), st.sampled_from(FLOAT_EDGES))))
    return obj


VALUE_PATTERNS = [np.array([v], dtype).tobytes() for dtype in ("<f4", "<f8", "<f2")
                  for v in (np.nan, np.inf, -np.inf, 1e300 if dtype == "<f8" else 6e4,
                            3.5e38 if dtype == "<f8" else 1.0)]
"""Little-endian bytes of NaN, infinities and values that overflow float32 (1e300, 3.5e38 as float64)."""


def _get(obj: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        obj = obj[key]
    return obj


def envelope_map(kind: Any, body: Any, *, sender: Any = "dev-1", seq: Any = 1) -> dict[str, Any]:
    k = kind.value if isinstance(kind, Kind) else kind
    ct = content_type(kind) if isinstance(kind, Kind) else "x"
    return {"v": 1, "k": k, "s": sender, "n": seq, "t": 1_700_000_000_000, "ct": ct, "b": body}


@st.composite
def envelopes(draw: st.DrawFn, templates: dict[Kind, Any]) -> bytes:
    """Envelope bytes: a template of any kind (its body and envelope fields mutated), junk, or raw bytes."""
    choice = draw(st.integers(0, 9))
    if choice == 0:
        return draw(st.binary(max_size=64))
    if choice == 1:
        return pack(draw(junk))
    kind = draw(st.sampled_from(sorted(templates, key=lambda k: k.value)))
    body = draw(mutated(templates[kind])) if draw(st.integers(0, 3)) else templates[kind]
    env = envelope_map(kind, body, seq=draw(st.one_of(st.integers(0, 50), st.sampled_from(INT_EDGES))))
    if draw(st.integers(0, 4)) == 0:
        env = draw(mutated(env, max_mutations=2))
    payload = pack(env)
    if draw(st.integers(0, 9)) == 0:  # truncated or with trailing garbage
        cut = draw(st.integers(0, len(payload)))
        payload = payload[:cut] if draw(st.booleans()) else payload + draw(st.binary(min_size=1, max_size=8))
    return payload


def topic_choices(site: str, devices: list[str]) -> st.SearchStrategy[str]:
    """Topics a receiver may see: its own, other sites', chunk topics with odd indices, and junk."""
    ours = [topics.device_up(site, d, u) for d in devices for u in topics.Uplink]
    ours += [topics.global_down(), topics.site_feedback(site), topics.adapter_up(site)]
    others = [topics.site_feedback("elsewhere"), topics.device_down(site, devices[0], topics.Downlink.CONFIG),
              topics.status(topics.Role.EDGE, "e"), topics.metrics(topics.Role.CLOUD, "c")]
    odd = [f"{topics.ROOT}/site/{site}/device/{devices[0]}/up/features/chunk/\u00b2",
           f"{topics.ROOT}/site/{site}/device/{devices[0]}/up/features/chunk/" + "9" * 30,
           f"{topics.ROOT}/site/{site}/device/{devices[0]}/up/telemetry", "megace/v2/x", "", "#", "megace/v1/"]
    base = st.sampled_from(ours)
    chunked = st.builds(lambda t, i: topics.chunk(t, i), base, st.integers(0, 5))
    return st.one_of(base, base, chunked, st.sampled_from(others + odd), st.text(max_size=20))
