"""SPEC §3 made exact, on the published vectors' bytes: error codes and feedback messages are one enumerated
list shared with the spec's tables, float fields read integers and float32 as the same number, int fields
refuse floats, and ``ct`` must match ``k`` where it is checked."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from broker.errors import DecodeError
from broker.wire import (
    CapabilityProfile,
    DeviceFeedback,
    ErrorCode,
    FeatureRecord,
    FeedbackMessage,
    Kind,
    decode_envelope,
)
from broker.wire.bodies import decode_body
from broker.wire.device import ERROR_CODES, FEEDBACK_MESSAGES
from broker.wire.envelope import check_content_type

DOCS = Path(__file__).parents[2] / "docs" / "wire"
SPEC = (DOCS / "SPEC.md").read_text()
VECTORS = {v["name"]: v for v in json.loads((DOCS / "test_vectors.json").read_text())}


def _table(header: str) -> dict[str, str]:
    """The rows of the markdown table whose header row starts with ``header``: first cell (unquoted) -> second."""
    lines = SPEC.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        m = re.fullmatch(r"\| `([a-z_]+)` \| (.*) \|", line)
        assert m is not None, f"table row not in the documented form: {line!r}"
        rows[m.group(1)] = m.group(2)
    return rows


def test_the_error_codes_are_one_enumerated_list_and_the_spec_tables_exactly_it() -> None:
    expected = ["malformed", "sender_mismatch", "unregistered", "registration", "registration_limit",
                "registration_dtype", "profile_mismatch", "non_finite", "bad_label", "busy", "internal"]
    assert [c.value for c in ErrorCode] == expected
    assert list(ERROR_CODES) == list(ErrorCode)
    assert _table("| `code` |") == {c.value: text for c, text in ERROR_CODES.items()}
    assert "UnknownModalityError`, `ArrayFormatError" not in SPEC  # classes are not codes any more


def test_the_feedback_messages_are_enumerated_and_tabled() -> None:
    assert [m.value for m in FeedbackMessage] == ["global", "view", "feedback"]
    assert _table("| `message` |") == {m.value: text for m, text in FEEDBACK_MESSAGES.items()}


def _swap(name: str, old: str, new: str) -> bytes:
    hexed = VECTORS[name]["hex"]
    assert hexed.count(old) == 1, f"{old} is not exactly once in {name}"
    return bytes.fromhex(hexed.replace(old, new))


@pytest.mark.parametrize("snr", ["14", "ca41a00000", "cb4034000000000000"], ids=["int", "float32", "float64"])
def test_a_float_field_reads_an_integer_or_float32_as_the_same_number(snr: str) -> None:
    """What a generic msgpack encoder writes for ``20.0`` (the int ``0x14``) means 20.0; only float64 is byte-exact."""
    rec = decode_body(decode_envelope(_swap("features-accel", "a3736e72cb4034000000000000", "a3736e72" + snr)))
    assert isinstance(rec, FeatureRecord)
    assert rec.quality == {"snr": 20.0} and type(rec.quality["snr"]) is float
    assert rec.label == 3 and rec.sample == 42


def test_registration_floats_written_as_ints_decode_to_the_vectors_meaning() -> None:
    hexed = VECTORS["register"]["hex"]
    rate, ram = "a7726174655f687acb4049000000000000", "a672616d5f6d62cb4070000000000000"  # 50.0, 256.0
    assert hexed.count(rate) == 1 and hexed.count(ram) == 1
    payload = bytes.fromhex(hexed.replace(rate, "a7726174655f687a32").replace(ram, "a672616d5f6d62cd0100"))
    prof = decode_body(decode_envelope(payload))
    assert isinstance(prof, CapabilityProfile)
    assert prof.modalities["accel"].rate_hz == 50.0 and type(prof.modalities["accel"].rate_hz) is float
    assert prof.compute == {"ram_mb": 256.0} and type(prof.compute["ram_mb"]) is float


def test_feedback_metrics_are_floats_whichever_number_type_arrives() -> None:
    m = VECTORS["feedback"]["meaning"]
    payload = _swap("feedback", "a773616d706c6573cb405e000000000000", "a773616d706c657378")  # samples: 120
    fb = decode_body(decode_envelope(payload))
    assert isinstance(fb, DeviceFeedback)
    assert fb.metrics == m["metrics"] and all(type(v) is float for v in fb.metrics.values())
    assert fb.message == "view" == FeedbackMessage.VIEW


@pytest.mark.parametrize("label", ["cb4008000000000000", "ca40400000", "c3"], ids=["float64", "float32", "true"])
def test_an_int_field_refuses_a_float_even_an_integral_one(label: str) -> None:
    env = decode_envelope(_swap("features-accel", "a56c6162656c03", "a56c6162656c" + label))
    with pytest.raises(DecodeError, match="label"):
        decode_body(env)


def test_a_content_type_that_is_not_its_kinds_is_refused_where_checked() -> None:
    good = decode_envelope(bytes.fromhex(VECTORS["features-accel"]["hex"]))
    check_content_type(good)  # the vector's own ct passes
    wrong = decode_envelope(_swap("features-accel", b"features+msgpack".hex(), b"register+msgpack".hex()))
    assert wrong.kind is Kind.FEATURES and wrong.content_type == "application/vnd.megace.register+msgpack"
    with pytest.raises(DecodeError, match="content type"):
        check_content_type(wrong)
