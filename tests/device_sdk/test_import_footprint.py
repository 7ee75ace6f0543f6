"""``import device_sdk`` stays numpy-free, and a gateway can publish from plain buffers without numpy at all.

Why: gateways are small machines (goal: under 40 MB resident after ``import device_sdk``; numpy alone is
about 15 MB) and many hold their samples in ``array.array``, ``bytes`` or a sensor driver's buffer. The
checks run in fresh interpreters (this process has numpy loaded long ago), and what the SDK sends is read
back from a real Mosquitto and compared with bytes built here with :mod:`struct`, not with the encoder.
"""

from __future__ import annotations

import array
import ctypes
import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from broker import topics
from broker.address import BrokerAddress
from broker.errors import ArrayFormatError
from broker.wire import FeatureBatch, FeatureRecord, Kind, decode_array, encode_array
from broker.wire.arrays import DTYPES, array_layout
from device_sdk.batcher import Batcher, signature
from sdk.modules import ROOT
from tests.support.collector import Collector


def _fresh(code: str, *args: str) -> dict:
    """Run ``code`` in a new interpreter from the repository root; it prints one JSON line."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_device_sdk_loads_no_numpy() -> None:
    got = _fresh("""
        import json, sys
        import device_sdk
        from device_sdk import DeviceClient, FeatureRecord
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("numpy", "torch", "onnxruntime"))
        from broker.wire import DTYPES, decode_array
        known = "<f4" in DTYPES and "<f3" not in DTYPES and len(DTYPES) == 14
        still_none = "numpy" not in sys.modules
        # the first array read off the bus loads numpy where it is needed, and decodes as always
        a = decode_array({"dtype": "<i2", "shape": [2, 1], "data": bytes([1, 0, 255, 255])})
        print(json.dumps({"heavy": heavy, "known": known, "still_none": still_none, "type": type(a).__module__,
                          "values": a.tolist(), "numpy_now": "numpy" in sys.modules}))
    """)
    assert got == {"heavy": [], "known": True, "still_none": True, "type": "numpy", "values": [[1], [-1]],
                   "numpy_now": True}


def test_a_gateway_publishes_buffers_without_ever_loading_numpy(mosquitto_addr: BrokerAddress,
                                                                 tmp_path: Path) -> None:
    code = """
        import array, json, sys
        from broker.address import BrokerAddress
        from device_sdk import DeviceClient, FeatureRecord
        host, port, store = sys.argv[1], int(sys.argv[2]), sys.argv[3]
        dev = DeviceClient("fp", "gw-1", BrokerAddress(host, port), store_path=store)
        assert dev.connect(10)
        raw = bytes(range(24))
        dev.publish(FeatureRecord("gw-1", 7, {"accel": array.array("f", [1.5, -2.0, 3.25])}))
        dev.publish(FeatureRecord("gw-1", 8, {"mic": memoryview(bytearray(raw)).cast("h", [3, 4]),
                                               "tag": raw[:5]}, label=2))
        assert dev.flush(10)
        dev.close(5)
        print(json.dumps({"numpy": "numpy" in sys.modules, "sent": dev.counters["sent.features"]}))
    """
    with Collector(mosquitto_addr, topics.device_up("fp", "gw-1", topics.Uplink.FEATURES)) as col:
        got = _fresh(code, mosquitto_addr.host, str(mosquitto_addr.port), str(tmp_path / "q.sqlite"))
        envs = [env for _, env in col.wait_for(2)]
    assert got == {"numpy": False, "sent": 2}
    assert [e.kind for e in envs] == [Kind.FEATURES, Kind.FEATURES]
    first, second = (e.body for e in envs)
    assert first["modalities"]["accel"] == {"dtype": "<f4", "shape": [3], "data": struct.pack("<3f", 1.5, -2.0, 3.25)}
    mic = second["modalities"]["mic"]
    assert (mic["dtype"], mic["shape"], bytes(mic["data"])) == ("<i2", [3, 4], bytes(range(24)))
    assert second["modalities"]["tag"] == {"dtype": "|u1", "shape": [5], "data": bytes(range(5))}
    # the edge's decoder reads them as the arrays they stand for
    rec = FeatureRecord.from_body(second)
    assert rec.label == 2
    np.testing.assert_array_equal(rec.modalities["mic"], np.arange(24, dtype=np.uint8).view("<i2").reshape(3, 4))


@pytest.mark.parametrize(("value", "dtype", "shape", "data"), [
    (array.array("d", [0.5, 2.0]), "<f8", [2], struct.pack("<2d", 0.5, 2.0)),
    (array.array("b", [-1, 2]), "|i1", [2], struct.pack("<2b", -1, 2)),
    (array.array("H", [1, 65535]), "<u2", [2], struct.pack("<2H", 1, 65535)),
    (array.array("q", [-(2**40)]), "<i8", [1], struct.pack("<q", -(2**40))),
    (array.array("f"), "<f4", [0], b""),
    ((ctypes.c_float * 2)(1.0, 4.0), "<f4", [2], struct.pack("<2f", 1.0, 4.0)),
    ((ctypes.c_uint32 * 2 * 2)(), "<u4", [2, 2], bytes(16)),
    (memoryview(struct.pack("<3?", True, False, True)).cast("?"), "|b1", [3], b"\x01\x00\x01"),
    (memoryview(struct.pack("<4i", 1, 2, 3, 4)).cast("i")[::2], "<i4", [2], struct.pack("<2i", 1, 3)),
])
def test_buffers_encode_as_the_spec_describes(value: object, dtype: str, shape: list[int], data: bytes) -> None:
    wire = encode_array(value)
    assert (wire["dtype"], wire["shape"], bytes(wire["data"])) == (dtype, shape, data)
    assert array_layout(value) == (tuple(shape), dtype, len(data))
    back = decode_array({**wire, "data": bytes(wire["data"])})
    assert back.dtype == DTYPES[dtype] and list(back.shape) == shape and back.tobytes() == data


def test_buffers_numpy_cannot_describe_are_refused_typed() -> None:
    with pytest.raises(ArrayFormatError):
        encode_array(array.array("u", "ab"))  # wide characters: no wire dtype
    # a big-endian buffer (ctypes format ">f") goes through numpy, which swaps it into the wire's form
    wire = encode_array((ctypes.c_float.__ctype_be__ * 2)(1.0, -3.0))
    assert (wire["dtype"], wire["shape"], bytes(wire["data"])) == ("<f4", [2], struct.pack("<2f", 1.0, -3.0))


def test_buffer_records_batch_like_numpy_records() -> None:
    buf = [FeatureRecord("d", i, {"x": array.array("f", [i, i + 0.5])}, label=i) for i in range(3)]
    arr = [FeatureRecord("d", i, {"x": np.array([i, i + 0.5], np.float32)}, label=i) for i in range(3)]
    assert signature(buf[0]) == signature(arr[0]) == (True, ("x", (2,), "<f4"))
    assert FeatureBatch.stack(buf).to_body()["modalities"] == FeatureBatch.stack(arr).to_body()["modalities"]
    sent: list[FeatureBatch] = []
    b = Batcher(lambda batch, seq: sent.append(batch), iter(range(10)).__next__, linger_ms=1000, batch_max=8,
                batch_bytes=16)
    for r in buf:
        b.add(r)  # 8 bytes a record: the second fills 16 bytes and closes the batch
    b.flush()
    assert [x.count for x in sent] == [2, 1]
    np.testing.assert_array_equal(sent[0].modalities["x"], [[0, 0.5], [1, 1.5]])
