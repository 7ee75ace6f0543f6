"""Status and metrics documents: the JSON a dashboard reads with no codec."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from broker.errors import DecodeError, SchemaVersionError
from broker.wire import Status, decode_metrics, metrics_payload
from broker.wire.status import OFFLINE, ONLINE
from tests.support.wire import raises_exactly


def test_status_encoding_is_compact_sorted_json() -> None:
    s = Status("edge", "e1", ONLINE, ts=1.5, detail={"site": "s1", "n": 2})
    assert s.encode() == b'{"detail":{"n":2,"site":"s1"},"id":"e1","role":"edge","state":"online","ts":1.5,"v":1}'
    assert (ONLINE, OFFLINE) == ("online", "offline")


def test_status_defaults() -> None:
    before = time.time()
    s = Status("cloud", "c", OFFLINE)
    after = time.time()
    assert before <= s.ts <= after
    assert s.detail == {} and s.v == 1
    assert Status("cloud", "c2", OFFLINE).detail is not s.detail


def test_status_round_trip() -> None:
    s = Status("device", "gw-7", ONLINE, ts=1_700_000_000.25, detail={"rssi": -40, "fw": "1.0"})
    assert Status.decode(s.encode()) == s
    assert Status.decode(bytearray(s.encode())) == s
    assert Status.decode(s.encode().decode()) == s  # a str payload is JSON too


def test_status_decoding_fills_and_converts() -> None:
    got = Status.decode(b'{"v":1,"role":"edge","id":"e","state":"offline","ts":3}')
    assert got == Status("edge", "e", "offline", ts=3.0, detail={}, v=1)
    assert type(got.ts) is float
    assert Status.decode(b'{"v":1,"role":"edge","id":"e","state":"online","ts":"4.5"}').ts == 4.5
    assert Status.decode(b'{"v":1,"role":"e","id":"e","state":"s","ts":0,"detail":[["a",1]]}').detail == {"a": 1}


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b'{"v":1,"id":"e","state":"online","ts":1}', "bad status document: 'role'"),
        (b'{"v":1,"role":"edge","state":"online","ts":1}', "bad status document: 'id'"),
        (b'{"v":1,"role":"edge","id":"e","ts":1}', "bad status document: 'state'"),
        (b'{"v":1,"role":"edge","id":"e","state":"online"}', "bad status document: 'ts'"),
        (b'{"v":1,"role":"edge","id":"e","state":"online","ts":"soon"}',
         "bad status document: could not convert string to float: 'soon'"),
        (b'{"v":1,"role":"edge","id":"e","state":"online","ts":null}',
         "bad status document: float() argument must be a string or a real number, not 'NoneType'"),
        (b'{"v":1,"role":"edge","id":"e","state":"online","ts":1,"detail":5}',
         "bad status document: 'int' object is not iterable"),
        (b'{"v":1,"role":"edge","id":"e","state":"online","ts":1,"detail":"ab"}',
         "bad status document: dictionary update sequence element #0 has length 1; 2 is required"),
    ],
)
def test_bad_status_documents(payload: bytes, message: str) -> None:
    with raises_exactly(DecodeError, message):
        Status.decode(payload)


@pytest.mark.parametrize(
    ("payload", "cls", "message"),
    [
        (b'[{"v":1}]', DecodeError, "expected a JSON object"),
        (b'"online"', DecodeError, "expected a JSON object"),
        (b"1", DecodeError, "expected a JSON object"),
        (b'{"role":"edge"}', SchemaVersionError, "schema version None is not supported"),
        (b'{"v":2}', SchemaVersionError, "schema version 2 is not supported"),
        (b'{"v":"1"}', SchemaVersionError, "schema version '1' is not supported"),
        (b'{"v":true}', SchemaVersionError, "schema version True is not supported"),
        (b'{"v":1.0}', SchemaVersionError, "schema version 1.0 is not supported"),
    ],
)
def test_bad_json_documents(payload: bytes, cls: type[Exception], message: str) -> None:
    with raises_exactly(cls, message):
        Status.decode(payload)
    with raises_exactly(cls, message):
        decode_metrics(payload)


@pytest.mark.parametrize("payload", [b"", b"{", b"\xff\xfe\x00", b"online", b"\x81\xa1v\x01"])
def test_not_json(payload: bytes) -> None:
    for decode in (Status.decode, decode_metrics):
        with raises_exactly(DecodeError) as info:
            decode(payload)
        assert str(info.value).startswith("not JSON: ")


def test_metrics_payload() -> None:
    before = time.time()
    payload = metrics_payload("edge", "e1", {"rounds": 3, "loss": np.float32(0.5), "acc": np.float64(0.25)})
    after = time.time()
    assert b" " not in payload  # compact separators
    doc = json.loads(payload)
    assert list(doc) == ["id", "metrics", "role", "ts", "v"]  # sorted keys
    assert list(doc["metrics"]) == ["acc", "loss", "rounds"]
    assert doc["v"] == 1 and doc["role"] == "edge" and doc["id"] == "e1"
    assert doc["metrics"] == {"rounds": 3, "loss": 0.5, "acc": 0.25}
    assert before <= doc["ts"] <= after
    assert decode_metrics(payload) == doc


def test_metrics_payload_layout() -> None:
    payload = metrics_payload("cloud", "c", {"b": 1, "a": np.float32(2.0)})
    head, ts = payload.split(b',"ts":')
    assert head == b'{"id":"c","metrics":{"a":2.0,"b":1},"role":"cloud"'
    assert ts.endswith(b',"v":1}')


@pytest.mark.parametrize(
    "payload",
    [b'{"v":1,"role":"edge","id":"e","ts":1}', b'{"v":1,"metrics":[1,2]}', b'{"v":1,"metrics":null}',
     b'{"v":1,"metrics":"x"}'],
)
def test_metrics_document_needs_a_metrics_map(payload: bytes) -> None:
    with raises_exactly(DecodeError, "metrics document has no metrics map"):
        decode_metrics(payload)


def test_minimal_metrics_document() -> None:
    assert decode_metrics(b'{"v":1,"metrics":{}}') == {"v": 1, "metrics": {}}


def test_found_by_fuzzing_a_timestamp_too_large_for_a_float_is_a_decode_error() -> None:
    payload = b'{"v":1,"role":"edge","id":"e","state":"online","ts":1' + b"0" * 400 + b"}"
    with raises_exactly(DecodeError, "bad status document: int too large to convert to float"):
        Status.decode(payload)  # was OverflowError, which no receiver catches


@pytest.mark.parametrize("payload", [b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000])
def test_found_by_fuzzing_json_nested_deeper_than_the_stack_is_a_decode_error(payload: bytes) -> None:
    for decode in (Status.decode, decode_metrics):
        with raises_exactly(DecodeError, "not JSON: nested too deeply"):
            decode(payload)  # was RecursionError
