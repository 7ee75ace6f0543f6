"""The language-neutral test vectors in docs/wire are reproduced byte for byte from their meaning."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from broker.chunking import frames
from broker.inbox import Inbox
from broker.wire import (
    CapabilityProfile,
    FeatureRecord,
    Kind,
    ModalityProfile,
    Prediction,
    decode_envelope,
    encode_envelope,
)
from broker.wire.bodies import decode_body

VECTORS = json.loads((Path(__file__).parents[2] / "docs" / "wire" / "test_vectors.json").read_text())
ENVELOPE_VECTORS = [v for v in VECTORS if "kind" in v["meaning"]]


def _array(spec: dict[str, Any]) -> np.ndarray:
    return np.array(spec["values"], dtype=spec["dtype"]).reshape(spec["shape"])


def _build(m: dict[str, Any]) -> Any:
    if m["kind"] == "features":
        return FeatureRecord(m["device"], m["sample"], {k: _array(v) for k, v in m["modalities"].items()},
                             label=m.get("label"), quality=m.get("quality", {}))
    if m["kind"] == "register":
        mods = {k: ModalityProfile(tuple(v["shape"]), v["dtype"], v["rate_hz"]) for k, v in m["modalities"].items()}
        return CapabilityProfile(m["device"], mods, m["compute"], m["sdk"])
    if m["kind"] == "prediction":
        return Prediction(m["device"], m["sample"], m["label"], _array(m["probs"]), m["model_version"])
    raise AssertionError(m["kind"])


@pytest.mark.parametrize("vector", ENVELOPE_VECTORS, ids=lambda v: v["name"])
def test_codec_reproduces_vector_bytes(vector: dict[str, Any]) -> None:
    m = vector["meaning"]
    payload = encode_envelope(Kind(m["kind"]), m["sender"], m["seq"], _build(m).to_body(), ts_ms=m["ts_ms"])
    assert payload.hex() == vector["hex"]


@pytest.mark.parametrize("vector", ENVELOPE_VECTORS, ids=lambda v: v["name"])
def test_vector_decodes_to_its_meaning(vector: dict[str, Any]) -> None:
    m = vector["meaning"]
    env = decode_envelope(bytes.fromhex(vector["hex"]))
    assert (env.kind.value, env.sender, env.seq, env.ts_ms) == (m["kind"], m["sender"], m["seq"], m["ts_ms"])
    msg = decode_body(env)
    rebuilt = _build(m)
    assert msg.to_body().keys() == rebuilt.to_body().keys()


def test_chunk_vector_reassembles(monkeypatch: pytest.MonkeyPatch) -> None:
    vec = next(v for v in VECTORS if v["name"] == "chunk-0-of-3")
    whole = bytes.fromhex(vec["meaning"]["whole_hex"])
    monkeypatch.setattr("os.urandom", lambda n: bytes(range(n)))
    msgs = frames("t", whole, sender="gw-7", seq=10, max_packet=512, ts_ms=1_700_000_000_000)
    assert len(msgs) == 3 and msgs[0][1].hex() == vec["hex"]
    inbox = Inbox()
    assert inbox.accept(vec["topic"], bytes.fromhex(vec["hex"])) is None
    assert inbox.accept(vec["topic"].replace("/chunk/0", "/chunk/2"), msgs[2][1]) is None
    got = inbox.accept(vec["topic"].replace("/chunk/0", "/chunk/1"), msgs[1][1])
    assert got is not None and got[1].body == decode_envelope(whole).body
    assert np.array_equal(decode_body(got[1]).modalities["accel"], np.arange(96, dtype="<f4").reshape(32, 3))
