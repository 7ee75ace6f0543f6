"""Arrays on the wire: ``{"dtype": "<f4", "shape": [..], "data": <bin>}``.

Raw little-endian bytes in C order: no pickle, no base64, and a decoder in any
language only needs the dtype table below. Decoding wraps the received bytes
with a numpy array (no copy), so decoded arrays are read-only.

numpy is loaded here on first use, never at import (:func:`numpy`): a gateway that only connects and
publishes from ``array.array``, ``memoryview`` or ``bytes`` never pays its memory (``import device_sdk``
stays numpy-free: ``tests/device_sdk/test_import_footprint.py``). Every module of the bus contract and
the SDK that needs numpy takes it from :func:`numpy`, so there is one place that decides when it loads.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any

from broker.errors import ArrayFormatError, OversizeError

if TYPE_CHECKING:
    import numpy as np

WIRE_ITEMSIZE: dict[str, int] = {
    "|b1": 1, "|i1": 1, "|u1": 1, "<i2": 2, "<u2": 2, "<i4": 4, "<u4": 4, "<i8": 8, "<u8": 8,
    "<f2": 2, "<f4": 4, "<f8": 8, "<c8": 8, "<c16": 16,
}
"""Wire dtype strings (numpy's ``dtype.str`` of the little-endian form) and their item sizes."""

MAX_NDIM = 8
MAX_EXTENT = 1 << 62
"""Bound on the product of an array's non-zero dimensions times its itemsize.

numpy refuses shapes whose extent overflows its index type even when one dimension is 0 (an empty
array of shape ``[0, 2**64-1]`` raises numpy's ValueError); refusing them here keeps every failure a
:class:`broker.errors.ArrayFormatError`."""

_np: ModuleType | None = None
_dtypes: dict[str, np.dtype] = {}  # wire name -> numpy dtype, filled when numpy loads
_wire_names: dict[np.dtype, str] = {}  # the reverse: a dict hit costs less than ``dtype.str``, which builds a str
COPY_MAX = 4096
"""Arrays of at most this many bytes are copied (``tobytes``) rather than viewed: for a record-sized array a copy is
cheaper to make and to pack than a byte-cast ``memoryview``; above it the view saves the copy."""


class _NotLoaded:
    """Stands for ``numpy.ndarray`` until numpy loads, so the encoder's fast-path test is one ``is``."""


_ndarray: type = _NotLoaded


def numpy() -> ModuleType:
    """The numpy module, imported on the first call (Python's import lock makes concurrent first calls safe).

    A cached global instead of a lazy module proxy: the per-record paths test ``_ndarray``/``_dtypes``
    directly and never pay an attribute hook, and a failure to import surfaces where numpy is needed.
    """
    global _np, _ndarray
    if _np is None:
        import numpy as np

        _dtypes.update({s: np.dtype(s) for s in WIRE_ITEMSIZE})
        _wire_names.update({d: s for s, d in _dtypes.items()})  # equal dtypes share their ``str``
        _ndarray = np.ndarray
        _np = np
    return _np


class _WireDtypes(Mapping):
    """``DTYPES``: the wire names (known without numpy) to numpy dtypes (which load numpy when read)."""

    def __getitem__(self, name: str) -> np.dtype:
        if name not in WIRE_ITEMSIZE:
            raise KeyError(name)
        numpy()
        return _dtypes[name]

    def __contains__(self, name: object) -> bool:
        return name in WIRE_ITEMSIZE

    def __iter__(self) -> Iterator[str]:
        return iter(WIRE_ITEMSIZE)

    def __len__(self) -> int:
        return len(WIRE_ITEMSIZE)


DTYPES: Mapping[str, np.dtype] = _WireDtypes()
"""Wire dtype strings to numpy dtypes (membership and iteration need no numpy)."""

# struct/buffer-protocol format characters by kind; the wire name follows from kind and item size
_SIGNED, _UNSIGNED, _FLOAT = frozenset("bhilqn"), frozenset("BHILQN"), frozenset("efd")
_NATIVE_LE = sys.byteorder == "little"


def _buffer_dtype(view: memoryview) -> str | None:
    """The wire dtype of a buffer's items, or None when only numpy can say (big-endian, structs, complex)."""
    fmt = view.format
    if len(fmt) == 2 and fmt[0] in "@=<" and (fmt[0] == "<" or _NATIVE_LE):
        fmt = fmt[1:]
    elif len(fmt) != 1 or not _NATIVE_LE:
        return None
    size = view.itemsize
    if fmt == "?":
        name = "|b1"
    elif fmt in _SIGNED or fmt in _UNSIGNED:
        name = ("|" if size == 1 else "<") + ("i" if fmt in _SIGNED else "u") + str(size)
    elif fmt in _FLOAT:
        name = f"<f{size}"
    else:
        return None
    return name if WIRE_ITEMSIZE.get(name) == size else None


def _buffer_of(obj: Any) -> tuple[str, memoryview] | None:
    """``(wire dtype, view)`` of a non-numpy buffer (``array.array``, ``memoryview``, ``bytes``, ctypes...).

    ``bytes`` are ``|u1``; to declare another dtype and a shape, pass ``memoryview(buf).cast("f", shape)``.
    """
    if type(obj).__module__ == "numpy":
        return None
    try:
        view = memoryview(obj)
    except TypeError:
        return None
    name = _buffer_dtype(view)
    return None if name is None else (name, view)


def wire_dtype(dtype: np.dtype) -> str:
    """The wire name of ``dtype``; big-endian input maps to its little-endian twin."""
    np = numpy()
    le = np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).byteorder == ">" else np.dtype(dtype)
    name = le.str
    if name not in WIRE_ITEMSIZE:
        raise ArrayFormatError(f"dtype {np.dtype(dtype)} is not supported on the wire (supported: {sorted(DTYPES)})")
    return name


def encode_array(array: Any) -> dict[str, Any]:
    """Describe ``array`` as a msgpack-ready map; contiguous little-endian arrays above :data:`COPY_MAX` bytes are
    not copied.

    Takes numpy arrays, and without numpy any buffer of plain numbers (see :func:`_buffer_of`).
    """
    if type(array) is _ndarray:  # the common case: one identity test, as fast as a top-level numpy import
        name = _wire_names.get(array.dtype)
        if name is not None and array.flags.c_contiguous:  # already wire-ready: no conversion
            return {"dtype": name, "shape": list(array.shape),
                    "data": array.tobytes() if array.nbytes <= COPY_MAX else memoryview(array).cast("B")}
    buf = _buffer_of(array)
    if buf is not None:
        name, view = buf
        data: bytes | memoryview = b"" if not view.nbytes else (
            view.cast("B") if view.c_contiguous else memoryview(view.tobytes()))
        return {"dtype": name, "shape": list(view.shape or ()), "data": data}
    np = numpy()
    a = array if type(array) is np.ndarray else np.asarray(array)
    name = wire_dtype(a.dtype)
    if a.dtype.str != name:
        a = a.astype(_dtypes[name])
    if not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)
    return {"dtype": name, "shape": list(a.shape), "data": memoryview(a).cast("B") if a.size else b""}


def array_layout(array: Any) -> tuple[tuple[int, ...], str, int]:
    """``(shape, dtype, nbytes)`` of anything :func:`encode_array` takes, loading numpy only for non-buffers."""
    if type(array) is _ndarray:
        return array.shape, array.dtype.str, array.nbytes
    buf = _buffer_of(array)
    if buf is not None:
        return tuple(buf[1].shape or ()), buf[0], buf[1].nbytes
    a = numpy().asarray(array)
    return a.shape, a.dtype.str, a.nbytes


def as_ndarray(array: Any) -> np.ndarray:
    """``array`` as a numpy array of the dtype and shape it would have on the wire (buffers: a read-only view)."""
    if type(array) is _ndarray:
        return array
    if _buffer_of(array) is not None:
        return decode_array(encode_array(array))
    return numpy().asarray(array)


_ARRAY_KEYS = frozenset({"dtype", "shape", "data"})


def decode_array(obj: Any, *, max_bytes: int | None = None) -> np.ndarray:
    """Rebuild an array from its wire map, checking that dtype, shape and length agree."""
    # keys view == set and a plain loop over the shape: no temporaries on this per-record path
    if not isinstance(obj, dict) or len(obj) != 3 or obj.keys() != _ARRAY_KEYS:
        raise ArrayFormatError("array must be a map with exactly the keys dtype, shape, data")
    name, shape, data = obj["dtype"], obj["shape"], obj["data"]
    dtype = _dtypes.get(name) if isinstance(name, str) else None
    if dtype is None:
        if _np is not None or not isinstance(name, str) or name not in WIRE_ITEMSIZE:
            raise ArrayFormatError(f"unsupported dtype {name!r}")
        numpy()
        dtype = _dtypes[name]
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
        return _ndarray(shape, dtype, data)
    except (ValueError, TypeError, OverflowError) as exc:  # belt and braces: numpy's own refusals stay typed
        raise ArrayFormatError(f"numpy refused shape {shape!r} of dtype {name}: {exc}") from None
