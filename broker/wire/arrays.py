"""Numpy arrays on the wire: ``{"dtype": "<f4", "shape": [..], "data": <bin>}``.

Raw little-endian bytes in C order: no pickle, no base64, and a decoder in any
language only needs the dtype table below. Decoding wraps the received bytes
with ``np.frombuffer`` (no copy), so decoded arrays are read-only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from broker.errors import ArrayFormatError, OversizeError

DTYPES: dict[str, np.dtype] = {
    s: np.dtype(s)
    for s in ("|b1", "|i1", "|u1", "<i2", "<u2", "<i4", "<u4", "<i8", "<u8", "<f2", "<f4", "<f8", "<c8", "<c16")
}
"""Wire dtype strings (numpy's ``dtype.str`` of the little-endian form) to dtypes."""

MAX_NDIM = 8


def wire_dtype(dtype: np.dtype) -> str:
    """The wire name of ``dtype``; big-endian input maps to its little-endian twin."""
    le = np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).byteorder == ">" else np.dtype(dtype)
    name = le.str
    if name not in DTYPES:
        raise ArrayFormatError(f"dtype {np.dtype(dtype)} is not supported on the wire (supported: {sorted(DTYPES)})")
    return name


def encode_array(array: np.ndarray) -> dict[str, Any]:
    """Describe ``array`` as a msgpack-ready map; contiguous little-endian arrays are not copied."""
    a = np.asarray(array)
    name = wire_dtype(a.dtype)
    if a.dtype.str != name:
        a = a.astype(DTYPES[name])
    if not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)
    data: bytes | memoryview = memoryview(a).cast("B") if a.size else b""
    return {"dtype": name, "shape": list(a.shape), "data": data}


def decode_array(obj: Any, *, max_bytes: int | None = None) -> np.ndarray:
    """Rebuild an array from its wire map, checking that dtype, shape and length agree."""
    if not isinstance(obj, dict) or set(obj) != {"dtype", "shape", "data"}:
        raise ArrayFormatError("array must be a map with exactly the keys dtype, shape, data")
    name, shape, data = obj["dtype"], obj["shape"], obj["data"]
    if not isinstance(name, str) or name not in DTYPES:
        raise ArrayFormatError(f"unsupported dtype {name!r}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise ArrayFormatError(f"shape must be a list of at most {MAX_NDIM} non-negative ints, got {shape!r}")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ArrayFormatError("array data must be binary")
    dtype = DTYPES[name]
    count = 1
    for d in shape:
        count *= d
    if count * dtype.itemsize != len(data):
        raise ArrayFormatError(
            f"dtype {name} and shape {shape} need {count * dtype.itemsize} bytes, payload has {len(data)}"
        )
    if max_bytes is not None and len(data) > max_bytes:
        raise OversizeError(f"array of {len(data)} bytes exceeds the limit of {max_bytes}")
    return np.frombuffer(data, dtype=dtype, count=count).reshape(shape)
