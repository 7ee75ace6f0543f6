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
MAX_EXTENT = 1 << 62
"""Bound on the product of an array's non-zero dimensions times its itemsize.

numpy refuses shapes whose extent overflows its index type even when one dimension is 0 (an empty
array of shape ``[0, 2**64-1]`` raises numpy's ValueError); refusing them here keeps every failure a
:class:`broker.errors.ArrayFormatError`."""


def wire_dtype(dtype: np.dtype) -> str:
    """The wire name of ``dtype``; big-endian input maps to its little-endian twin."""
    le = np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).byteorder == ">" else np.dtype(dtype)
    name = le.str
    if name not in DTYPES:
        raise ArrayFormatError(f"dtype {np.dtype(dtype)} is not supported on the wire (supported: {sorted(DTYPES)})")
    return name


def encode_array(array: np.ndarray) -> dict[str, Any]:
    """Describe ``array`` as a msgpack-ready map; contiguous little-endian arrays are not copied."""
    a = array if type(array) is np.ndarray else np.asarray(array)
    name = a.dtype.str
    if name in DTYPES and a.flags.c_contiguous:  # the common case, already wire-ready: no copy, no dtype lookups
        return {"dtype": name, "shape": list(a.shape), "data": memoryview(a).cast("B") if a.size else b""}
    name = wire_dtype(a.dtype)
    if a.dtype.str != name:
        a = a.astype(DTYPES[name])
    if not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)
    data: bytes | memoryview = memoryview(a).cast("B") if a.size else b""
    return {"dtype": name, "shape": list(a.shape), "data": data}


_ARRAY_KEYS = frozenset({"dtype", "shape", "data"})


def decode_array(obj: Any, *, max_bytes: int | None = None) -> np.ndarray:
    """Rebuild an array from its wire map, checking that dtype, shape and length agree."""
    # keys view == set and a plain loop over the shape: no temporaries on this per-record path
    if not isinstance(obj, dict) or len(obj) != 3 or obj.keys() != _ARRAY_KEYS:
        raise ArrayFormatError("array must be a map with exactly the keys dtype, shape, data")
    name, shape, data = obj["dtype"], obj["shape"], obj["data"]
    dtype = DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise ArrayFormatError(f"unsupported dtype {name!r}")
    count = 1
    extent = dtype.itemsize
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
        count = -1
    else:
        for d in shape:
            if (type(d) is not int or d < 0) and (not isinstance(d, int) or isinstance(d, bool) or d < 0):
                count = -1
                break
            count *= d
            if d:
                extent *= d
    if count < 0:
        raise ArrayFormatError(f"shape must be a list of at most {MAX_NDIM} non-negative ints, got {shape!r}")
    if extent > MAX_EXTENT:
        raise ArrayFormatError(f"shape {shape!r} of dtype {name} is too large for any array")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ArrayFormatError("array data must be binary")
    if count * dtype.itemsize != len(data):
        raise ArrayFormatError(
            f"dtype {name} and shape {shape} need {count * dtype.itemsize} bytes, payload has {len(data)}"
        )
    if max_bytes is not None and len(data) > max_bytes:
        raise OversizeError(f"array of {len(data)} bytes exceeds the limit of {max_bytes}")
    # one constructor call instead of frombuffer + reshape; still a zero-copy view of ``data``
    try:
        return np.ndarray(shape, dtype, data)
    except (ValueError, TypeError, OverflowError) as exc:  # belt and braces: numpy's own refusals stay typed
        raise ArrayFormatError(f"numpy refused shape {shape!r} of dtype {name}: {exc}") from None
