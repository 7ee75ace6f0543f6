"""Fuzz targets: one input strategy and one property check per receiver of bus input.

The property, for every target: a decoder returns or raises a :class:`broker.errors.WireError`
subclass, nothing else; a service's handler never raises and never counts an internal error, and an
input it rejects leaves its state (registry, sequence guards, replay buffer, versions) as it was.
A violation raises :class:`PropertyViolation`; the short runs let hypothesis shrink it, the long run
(``tools/fuzz.py``) records it and goes on.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import strategies as st

from broker import topics
from broker.address import BrokerAddress
from broker.chunking import Reassembler, frames
from broker.errors import ChunkLimitError, WireError
from broker.inbox import Inbox
from broker.wire import (
    CapabilityProfile,
    DeviceConfig,
    ErrorReport,
    FeatureBatch,
    FeatureRecord,
    Kind,
    ModalityProfile,
    Prediction,
    Status,
    decode_array,
    decode_envelope,
    decode_metrics,
)
from broker.wire.bodies import decode_body
from broker.wire.envelope import Envelope
from tests.fuzz.strategies import envelopes, hostile_arrays, junk, mutated, pack, plain, topic_choices

NOWHERE = BrokerAddress("127.0.0.1", 1)  # services are built for it and never connect


class PropertyViolation(AssertionError):
    """A receiver did something the contract forbids (an untyped error, an internal error, a state change)."""


def expect_wire(call: Callable[[], Any], what: str) -> Any:
    """Run a decoder: a WireError is a correct refusal, any other exception is a bug."""
    try:
        return call()
    except WireError:
        return None
    except Exception as exc:  # the property under test
        raise PropertyViolation(f"{what}: {type(exc).__name__}: {exc}") from exc


# ------------------------------------------------------------------------------------ templates
def _arr(a: np.ndarray) -> dict[str, Any]:
    return {"dtype": a.dtype.str, "shape": list(a.shape), "data": a.tobytes()}


TENSORS = {"m.lora_A.weight": _arr(np.ones((2, 3), np.float32)), "m.lora_B.weight": _arr(np.ones((3, 2), "<f2"))}
DEVICE_TEMPLATES: dict[Kind, Any] = {k: plain(v) for k, v in {
    Kind.FEATURES: FeatureRecord("dev-1", 3, {"imu": np.ones((2, 6), np.float32), "env": np.ones(8, np.float64)},
                                 label=1, quality={"snr": 3.0}).to_body(),
    Kind.FEATURES_BATCH: FeatureBatch("dev-1", 3, 2, {"imu": np.ones((2, 2, 6), np.float32),
                                                     "env": np.ones((2, 8), np.float64)},
                                      labels=np.array([1, 0], "<i4"), times=np.array([5, 6], "<u8")).to_body(),
    Kind.REGISTER: CapabilityProfile("dev-1", {"imu": ModalityProfile((4, 6), "<f4", 10.0)}, {"ram": 64.0},
                                     "1").to_body(),
    Kind.CONFIG: DeviceConfig(["imu"], {"imu": 10.0}, {"imu": (4, 6)}, 2).to_body(),
    Kind.PREDICTION: Prediction("dev-1", 3, 1, np.full(4, 0.25, np.float32), 2).to_body(),
    Kind.ERROR: ErrorReport("profile_mismatch", "no", 7).to_body(),
    Kind.FEEDBACK: {"global_version": 2, "metrics": {"acc": 0.5}, "message": "ok"},
    Kind.ADAPTER: {"edge": "e", "site": "s", "seq": 1, "base_version": 0, "base_model": "fp", "rank": 2,
                   "alpha": 4.0, "samples": 9, "modalities": {"imu": 9}, "metrics": {"loss": 0.5}, "tensors": TENSORS},
    Kind.GLOBAL: {"version": 1, "base_model": "fp", "strategy": "fedavg", "rank": 2, "alpha": 2.0,
                  "contributors": ["e"], "tensors": TENSORS},
    Kind.SITE_FEEDBACK: {"site": "s", "version": 1, "rank": 2, "stats": {"drift": 0.1}, "accepted": [1],
                         "rejected": [{"seq": 2, "reason": "stale"}], "tensors": TENSORS},
    Kind.MODEL: {"model_version": 2, "format": "onnx", "sha256": hashlib.sha256(b"onnx").digest(), "classes": 4,
                 "inputs": {"imu": [4, 6]}, "input_names": ["imu", "imu_mask"], "data": b"onnx"},
    Kind.CHUNK: {"transfer": bytes(16), "index": 0, "count": 1, "size": 3, "sha256": hashlib.sha256(b"abc").digest(),
                 "data": b"abc"},
}.items()}


# ------------------------------------------------------------------------------------- decoders
def run_envelope(payload: bytes) -> None:
    env = expect_wire(lambda: decode_envelope(payload, max_size=1 << 20), "decode_envelope")
    if env is not None:
        expect_wire(lambda: decode_body(env), f"decode_body({env.kind.value})")


def run_body(item: tuple[Kind, Any]) -> None:
    kind, body = item
    env = Envelope(kind=kind, sender="x", seq=0, ts_ms=0, content_type="", body=body)
    expect_wire(lambda: decode_body(env), f"decode_body({kind.value})")
    if kind in (Kind.FEATURES, Kind.INFER):
        expect_wire(lambda: FeatureRecord.from_body(body, allowed_modalities={"imu", "env"}, max_array_bytes=256),
                    "FeatureRecord.from_body(bounded)")
    if kind is Kind.FEATURES_BATCH:
        got = expect_wire(lambda: FeatureBatch.from_body(body, max_records=8, max_bytes=4096, max_record_bytes=256),
                          "FeatureBatch.from_body(bounded)")
        if got is not None and any(a.shape[:1] != (got.count,) for a in got.modalities.values()):
            raise PropertyViolation("FeatureBatch.from_body returned a stacked array not [count, ...]")


def run_array(obj: Any) -> None:
    got = expect_wire(lambda: decode_array(obj, max_bytes=4096), "decode_array")
    if got is not None and got.nbytes > 4096:
        raise PropertyViolation(f"decode_array returned {got.nbytes} bytes over max_bytes 4096")


def run_status(payload: bytes) -> None:
    expect_wire(lambda: Status.decode(payload), "Status.decode")
    expect_wire(lambda: decode_metrics(payload), "decode_metrics")


json_docs = st.one_of(
    st.binary(max_size=40),
    st.builds(lambda obj: _json(obj), junk),
    st.builds(lambda ts, detail: ('{"v":1,"role":"edge","id":"e","state":"online","ts":' + ts + ',"detail":'
                                  + detail + "}").encode(),
              st.sampled_from(["1", "1" + "0" * 400, "1e999", "-1e999", "NaN", '"x"', "null", "[]", "true"]),
              st.sampled_from(["{}", "[]", '"ab"', "5", '[["a",1]]', "[" * 3000 + "]" * 3000])),
    st.sampled_from([b"[" * 100_000, b'{"v":1,"metrics":' + b"[" * 5000 + b"]" * 5000 + b"}"]),
)


def _json(obj: Any) -> bytes:
    import json

    try:
        return json.dumps(obj).encode()
    except (TypeError, ValueError):
        return repr(obj).encode()


# ---------------------------------------------------------------------------------------- chunks
@st.composite
def chunk_script(draw: st.DrawFn) -> list[tuple[str, str, Any]]:
    """(key, sender, body) feeds: pieces of real transfers, shuffled and bent, from a few senders."""
    ops: list[tuple[str, str, Any]] = []
    for _ in range(draw(st.integers(1, 4))):
        sender = draw(st.sampled_from(["a", "b", "c"]))
        payload = draw(st.binary(min_size=500, max_size=1200))  # always more than one packet below
        bodies = [decode_envelope(p).body for _, p in frames("megace/v1/cloud/down/global", payload, sender=sender,
                                                             max_packet=256 + draw(st.integers(40, 240)))]
        for body in draw(st.permutations(bodies))[: draw(st.integers(1, len(bodies)))]:
            body = dict(body)
            body["data"] = bytes(body["data"])
            ops.append((f"t|{sender}", sender, draw(mutated(body, 2)) if draw(st.integers(0, 3)) == 0 else body))
    if draw(st.booleans()):
        ops.append(("t|x", draw(st.sampled_from(["a", "b", "c"])), draw(junk)))
    return draw(st.permutations(ops))


def run_chunks(ops: list[tuple[str, str, Any]]) -> None:
    r = Reassembler(max_transfers=6, max_bytes=3000, max_transfer_bytes=1500, max_sender_bytes=1600,
                    max_sender_transfers=2)
    for key, sender, body in ops:
        before = {k: (t.size, dict(t.parts)) for k, t in r._open.items()}
        try:
            r.feed(key, body, sender=sender)
        except ChunkLimitError:
            after = {k: (t.size, dict(t.parts)) for k, t in r._open.items()}
            if after != before:
                raise PropertyViolation("a refused chunk changed the reassembler") from None
        except WireError:
            pass
        except Exception as exc:
            raise PropertyViolation(f"Reassembler.feed: {type(exc).__name__}: {exc}") from exc
        if r.reserved_bytes > r.max_bytes or r.open_transfers > r.max_transfers:
            raise PropertyViolation(f"global bound broken: {r.reserved_bytes} bytes, {r.open_transfers} transfers")
        for who in ("a", "b", "c"):
            if r.sender_bytes(who) > r.max_sender_bytes:
                raise PropertyViolation(f"sender {who} holds {r.sender_bytes(who)} bytes")


@st.composite
def inbox_script(draw: st.DrawFn) -> list[tuple[str, bytes]]:
    """(topic, payload) messages: whole envelopes and the chunk frames of one, some bent or misrouted."""
    site, devs = "s1", ["dev-1", "dev-2"]
    msgs: list[tuple[str, bytes]] = []
    for _ in range(draw(st.integers(1, 3))):
        topic = draw(topic_choices(site, devs))
        payload = draw(envelopes(DEVICE_TEMPLATES))
        if draw(st.booleans()) and len(payload) > 60:
            parts = frames(topic if topic.startswith("megace/v1/") else topics.global_down(), payload, sender="x",
                           max_packet=256 + draw(st.integers(20, 200)))
            picked = draw(st.permutations(parts))[: draw(st.integers(1, len(parts)))]
            msgs += [(t, p if draw(st.integers(0, 5)) else p[: len(p) // 2]) for t, p in picked]
        else:
            msgs.append((topic, payload))
    return msgs


def run_inbox(msgs: list[tuple[str, bytes]]) -> None:
    inbox = Inbox(max_payload=1 << 16)
    for topic, payload in msgs:
        got = expect_wire(lambda: inbox.accept(topic, payload), f"Inbox.accept({topic!r})")  # noqa: B023
        if got is not None:
            expect_wire(lambda: decode_body(got[1]), "decode_body after Inbox")  # noqa: B023


@dataclass(frozen=True)
class Target:
    """A named fuzz target: what to generate and what to check."""

    name: str
    strategy: Callable[[], st.SearchStrategy[Any]]
    run: Callable[[Any], None]


DECODER_TARGETS = [
    Target("envelope", lambda: envelopes(DEVICE_TEMPLATES), run_envelope),
    Target("bodies", lambda: st.sampled_from(sorted(DEVICE_TEMPLATES, key=lambda k: k.value)).flatmap(
        lambda k: st.tuples(st.just(k), mutated(DEVICE_TEMPLATES[k]))), run_body),
    Target("arrays", hostile_arrays, run_array),
    Target("status", lambda: json_docs, run_status),
    Target("chunks", chunk_script, run_chunks),
    Target("inbox", inbox_script, run_inbox),
]


def tmpdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))


__all__ = ["DECODER_TARGETS", "DEVICE_TEMPLATES", "NOWHERE", "PropertyViolation", "Target", "expect_wire", "pack",
           "tmpdir"]
