"""The edge sends its ONNX model to the devices that asked, and a real SDK device takes it over a real broker.

Edge side: a real ``EdgeCore`` (signing with its Ed25519 key) decides who gets the model and builds the signed,
chunked downlinks (``edge_agent.model_push``). Device side: a real ``DeviceClient`` with ``model_dir`` and the
edge's public key, over Mosquitto. The model is a small real ONNX graph (tests/support/onnx_models.py) whose
outputs numpy computes independently.
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from broker import topics
from broker.address import BrokerAddress
from broker.chunking import frames
from broker.inbox import Inbox
from broker.signing import Signer, Verifier, generate_private_key, private_pem, public_pem, unsigned
from broker.wire import (
    CapabilityProfile,
    FeatureRecord,
    Kind,
    ModalityProfile,
    ModelUpdate,
    Prediction,
    Status,
    decode_envelope,
    encode_envelope,
)
from device_sdk import DeviceClient
from edge_agent.core import EdgeCore, Outgoing
from edge_agent.model_push import (
    ArtifactError,
    model_update,
    push_model,
    push_model_per_device,
    push_to_device,
    wire_bytes,
)
from edge_agent.registry import DeviceRegistry
from tests.support.collector import Collector
from tests.support.edge_testkit import edge_config, toy_profile
from tests.support.onnx_models import build, reference

INPUTS = {"imu": (4, 6), "env": (1, 8)}  # the toy edge model's modalities
NOWHERE = BrokerAddress("127.0.0.1", 1)


@dataclass(frozen=True)
class Artifact:
    """The shape of ``megace_model.onnx.OnnxArtifact`` (read by attribute by the push)."""

    version: int
    data: bytes
    sha256: str
    inputs: dict[str, list[int]]
    input_names: tuple[str, ...]
    classes: int
    parity: float = 0.0


def artifact(version: int, seed: int, inputs: dict[str, tuple[int, int]] = INPUTS) -> Artifact:
    data = build(inputs, 4, seed=seed, masks=True)
    names = (*(n for m in sorted(inputs) for n in (m, f"{m}_mask")), "presence")
    return Artifact(version, data, hashlib.sha256(data).hexdigest(), {m: list(s) for m, s in inputs.items()},
                    names, 4)


@pytest.fixture
def edge_keys(tmp_path: Path) -> dict[str, Any]:
    key = generate_private_key()
    (tmp_path / "edge.key").write_bytes(private_pem(key))
    (tmp_path / "edge.pub").write_bytes(public_pem(key.public_key()))
    return {"signer": Signer(key), "key": tmp_path / "edge.key", "pub": tmp_path / "edge.pub"}


def make_core(tmp_path: Path, addr: BrokerAddress, keys: dict[str, Any], max_packet: int = 1024) -> EdgeCore:
    return EdgeCore(edge_config(tmp_path / "state", addr, {"signing": {"key_file": str(keys["key"])},
                                                            "limits": {"max_packet": max_packet}}))


def register(core: EdgeCore, device: str, profile: CapabilityProfile, seq: int = 1) -> list[Outgoing]:
    payload = encode_envelope(Kind.REGISTER, device, seq, profile.to_body())
    return core.ingest(topics.device_up(core.site, device, topics.Uplink.REGISTER), payload).out


def opened(core: EdgeCore, keys: dict[str, Any], out: list[Outgoing]) -> list[tuple[str, Kind, int, Any]]:
    """What a device with the edge's key reads from ``out``: (device, kind, seq, body), chunks reassembled."""
    inbox = Inbox(opener=lambda _p, payload: Verifier([keys["signer"].public_key]).open(payload))
    got = []
    for o in out:
        res = inbox.accept(o.topic, o.payload)
        if res is not None:
            got.append((res[0].device, res[1].kind, res[1].seq, res[1].body))
    return got


def test_the_edge_sends_to_devices_that_asked_and_fit_signed_and_chunked(tmp_path: Path, edge_keys: dict) -> None:
    core = make_core(tmp_path, NOWHERE, edge_keys, max_packet=512)
    asks = replace(toy_profile("a1"), local_model=True)
    register(core, "a1", asks)
    register(core, "plain", toy_profile("plain"))  # did not ask
    register(core, "imu-only", replace(CapabilityProfile("imu-only", {"imu": ModalityProfile((4, 6))}),
                                       local_model=True))
    assert push_to_device(core, "a1") == []  # no model yet
    art = artifact(3, seed=1)
    out = push_model(core, art)
    assert push_model(core, art) == []  # already current: a service may call it after every refresh
    got = opened(core, edge_keys, out)
    assert [(d, k) for d, k, _, _ in got] == [("a1", Kind.MODEL), ("imu-only", Kind.MODEL)]
    assert all(o.topic.startswith(topics.device_down(core.site, o.topic.split("/")[5], topics.Downlink.MODEL))
               for o in out)
    assert sum("/chunk/" in o.topic for o in out) == len(out) and max(len(o.payload) for o in out) <= 512
    msg = ModelUpdate.from_body(got[0][3])
    assert (msg.model_version, msg.data, msg.sha256.hex(), msg.classes) == (3, art.data, art.sha256, 4)
    assert msg.inputs == INPUTS and msg.input_names == list(art.input_names)
    # each device's chunks carry that device's envelope seq; seqs keep increasing across devices
    seqs = {d: {decode_envelope(o.payload).seq for o in out if f"/device/{d}/" in o.topic} for d in ("a1", "imu-only")}
    assert all(len(s) == 1 for s in seqs.values()) and min(seqs["imu-only"]) > max(seqs["a1"])
    assert core.counters["model_push.sent"] == 2 and core.counters["model_push.bytes"] == wire_bytes(out)
    # a device that did not ask is simply not a recipient: no skip is counted for it
    assert not [k for k in core.counters.snapshot() if k.startswith("model_push.skipped")]
    assert push_model(core, replace(art, version=9), max_packet=10**6)[0].topic.endswith("/down/model")  # one packet
    # one device at a time (a big model to many devices): the same messages, built lazily
    parts = push_model_per_device(core, replace(art, version=4))
    assert core.model_update.model_version == 4
    lazily = [list(p) for p in parts]
    assert [len(p) for p in lazily] == [sum(f"/device/{d}/" in o.topic for o in out) for d in ("a1", "imu-only")]
    # the flag and the held version survive the registry's persistence
    again = DeviceRegistry(core.config.model)
    again.load_dict(core.registry.to_dict())
    assert again.devices["a1"].local_model and not again.devices["plain"].local_model
    # a model for other widths is not sent to a device it cannot serve
    assert push_model(core, artifact(4, seed=1, inputs={"imu": (4, 7)})) == []
    assert core.counters["model_push.skipped.unfit"] == 2
    # an artifact whose bytes are not its sha256 is refused before anything is set or sent
    with pytest.raises(ArtifactError):
        push_model(core, replace(art, sha256="00" * 32))
    assert core.model_update.inputs == {"imu": (4, 7)}


def test_a_device_that_registers_later_gets_the_current_model_once(tmp_path: Path, edge_keys: dict) -> None:
    core = make_core(tmp_path, NOWHERE, edge_keys)
    assert push_model(core, artifact(5, seed=2)) == []  # nobody registered yet
    out = register(core, "late", replace(toy_profile("late"), local_model=True))
    kinds = [k for _, k, _, _ in opened(core, edge_keys, out)]
    assert kinds == [Kind.CONFIG, Kind.MODEL]
    # its re-registration says it holds v5: config only, counted
    out = register(core, "late", replace(toy_profile("late"), local_model=True, model_version=5), seq=2)
    assert [k for _, k, _, _ in opened(core, edge_keys, out)] == [Kind.CONFIG]
    assert core.counters["model_push.skipped.current"] == 1
    assert [k for _, k, _, _ in opened(core, edge_keys, register(core, "p", toy_profile("p")))] == [Kind.CONFIG]
    push_model(core, None)
    assert [k for _, k, _, _ in opened(core, edge_keys, register(core, "late2", replace(
        toy_profile("late2"), local_model=True)))] == [Kind.CONFIG]


# ----------------------------------------------------------------------------------------------- over the bus
class EdgePublisher:
    """The edge's side of the broker for this test: publishes Outgoing messages as the service would."""

    def __init__(self, addr: BrokerAddress) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"edge-{uuid.uuid4().hex[:6]}",
                                  protocol=mqtt.MQTTv311)
        self.client.connect(addr.host, addr.port)
        self.client.loop_start()

    def send(self, out: list[Outgoing] | list[tuple[str, bytes]]) -> None:
        for o in out:
            topic, payload = (o.topic, o.payload) if isinstance(o, Outgoing) else o
            self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _until(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture
def bus(mosquitto_addr: BrokerAddress) -> Iterator[EdgePublisher]:
    pub = EdgePublisher(mosquitto_addr)
    yield pub
    pub.close()


SAMPLE = {"imu": np.random.default_rng(3).normal(size=(2, 6)).astype(np.float32),
          "env": np.random.default_rng(4).normal(size=8).astype(np.float32)}


def test_a_model_update_over_the_bus_then_local_predictions_and_a_restart_keeps_it(
        tmp_path: Path, mosquitto_addr: BrokerAddress, edge_keys: dict, bus: EdgePublisher) -> None:
    core = make_core(tmp_path, mosquitto_addr, edge_keys)
    site, dev_id = core.site, f"gw-{uuid.uuid4().hex[:6]}"
    filters = [*topics.subscriptions(topics.site_device_uplinks(site)), topics.status(topics.Role.DEVICE, dev_id, site)]
    with Collector(mosquitto_addr, *filters) as col:
        dev = DeviceClient(site, dev_id, mosquitto_addr, store_path=tmp_path / "q.sqlite",
                           model_dir=tmp_path / "models", edge_key=edge_keys["pub"])
        try:
            assert dev.connect(10)
            rec = FeatureRecord(dev_id, 11, SAMPLE)
            seq = dev.predict(rec)  # no model yet: the request goes to the edge
            assert isinstance(seq, int) and dev.counters["predict.edge"] == 1
            dev.register(toy_profile(dev_id))

            def uplinks(kind: Kind) -> list[tuple[str, bytes]]:
                return [(t, p) for t, p, _ in col.raw if "/status/" not in t and decode_envelope(p).kind is kind]

            _until(lambda: uplinks(Kind.REGISTER) and uplinks(Kind.INFER), "the registration and the request")
            assert decode_envelope(uplinks(Kind.INFER)[0][1]).seq == seq
            (reg_topic, reg_payload), = uplinks(Kind.REGISTER)
            assert decode_envelope(reg_payload).body["local_model"] is True
            bus.send(core.ingest(reg_topic, reg_payload).out)  # the config
            out = push_model(core, artifact(1, seed=9), max_packet=600)  # the model, chunked and signed
            assert len(out) > 2
            bus.send(out)
            _until(lambda: dev.model is not None and dev.model.version == 1, "the model installed")
            pred = dev.predict(rec)
            assert isinstance(pred, Prediction) and (pred.sample, pred.model_version) == (11, 1)
            want = reference(SAMPLE, INPUTS, 4, seed=9, masks=True)
            assert np.allclose(pred.probs, want, atol=1e-5) and pred.label == int(np.argmax(want))
            assert dev.counters["predict.local"] == 1 and dev.counters["model_version"] == 1
            assert dev.counters["received.model"] == 1 and dev.counters["rejected"] == 0
            # the device re-registers with the version it holds: the edge does not send it again
            _until(lambda: any(decode_envelope(p).body.get("model_version") == 1 for _, p in uplinks(Kind.REGISTER)),
                   "a re-registration with model_version 1")
            t, p = next((t, p) for t, p in uplinks(Kind.REGISTER) if decode_envelope(p).body.get("model_version"))
            assert [decode_envelope(unsigned(o.payload)).kind for o in core.ingest(t, p).out] == [Kind.CONFIG]
            # its status says which model it runs
            status_topic = topics.status(topics.Role.DEVICE, dev_id, site)
            statuses = [Status.decode(p) for t, p, _ in col.raw if t == status_topic]
            _until(lambda: any(Status.decode(p).detail.get("model_version") == 1 for t, p, _ in col.raw
                               if t == status_topic), "a status with model_version 1")
            assert statuses[0].detail["model_version"] is None
        finally:
            dev.close(5)
    # a restarted gateway, not even connected, predicts with the model it kept
    again = DeviceClient(site, dev_id, mosquitto_addr, store_path=tmp_path / "q.sqlite", model_dir=tmp_path / "models")
    try:
        assert again.model is not None and again.model.version == 1
        pred = again.predict(FeatureRecord(dev_id, 12, SAMPLE))
        assert isinstance(pred, Prediction) and np.allclose(pred.probs, want, atol=1e-5)
    finally:
        again.close(1)


def test_forged_unsigned_or_bad_models_over_the_bus_change_nothing(
        tmp_path: Path, mosquitto_addr: BrokerAddress, edge_keys: dict, bus: EdgePublisher) -> None:
    core = make_core(tmp_path, mosquitto_addr, edge_keys)
    attacker = Signer(generate_private_key())
    site, dev_id = core.site, f"gw-{uuid.uuid4().hex[:6]}"
    dev = DeviceClient(site, dev_id, mosquitto_addr, store_path=tmp_path / "q.sqlite",
                       model_dir=tmp_path / "models", edge_key=edge_keys["pub"])
    profile = replace(toy_profile(dev_id), local_model=True)
    register(core, dev_id, profile)
    try:
        assert dev.connect(10)
        dev.register(toy_profile(dev_id))
        time.sleep(0.3)
        bus.send(push_model(core, artifact(1, seed=1), max_packet=600))
        _until(lambda: dev.model is not None and dev.model.version == 1, "v1 installed")
        rec = FeatureRecord(dev_id, 1, SAMPLE)
        first = dev.predict(rec)
        assert isinstance(first, Prediction)
        topic = topics.device_down(site, dev_id, topics.Downlink.MODEL)
        good2 = ModelUpdate.from_body(model_update(artifact(2, seed=2)).to_body())
        envelope = encode_envelope(Kind.MODEL, core.edge_id, 10**6, good2.to_body())
        signed = edge_keys["signer"].sign(envelope)
        tampered = signed[:-40] + bytes([signed[-40] ^ 1]) + signed[-39:]
        data = good2.data[: len(good2.data) // 2]
        attempts: list[tuple[str, list[tuple[str, bytes]] | list[Outgoing]]] = [
            ("rejected.UnsignedError", frames(topic, envelope, sender=core.edge_id, seq=10**6, max_packet=600)),
            ("rejected.UnknownKeyError", frames(topic, attacker.sign(envelope), sender="x", seq=1, max_packet=600)),
            ("rejected.BadSignatureError", frames(topic, tampered, sender=core.edge_id, seq=10**6, max_packet=600)),
            # signed by the edge, but a bad model (a buggy edge): the device's own checks refuse them
            ("model_rejected.corrupt", core.down_frames(dev_id, Kind.MODEL, replace(
                good2, data=data, sha256=hashlib.sha256(data).digest()), 600)),
            ("model_rejected.sha256", core.down_frames(dev_id, Kind.MODEL, replace(good2, sha256=bytes(32)), 600)),
            ("model_rejected.profile", core.down_frames(dev_id, Kind.MODEL, replace(
                good2, inputs={"imu": (4, 7), "env": (1, 8)}), 600)),
            ("model_rejected.stale", core.down_frames(dev_id, Kind.MODEL, replace(good2, model_version=0), 600)),
        ]
        for counter, msgs in attempts:
            bus.send(msgs)
            _until(lambda c=counter: dev.counters[c] == 1, counter)
            assert dev._installer is not None and dev._installer.idle(10)
            assert dev.model is not None and dev.model.version == 1, counter
            again = dev.predict(rec)
            assert isinstance(again, Prediction) and np.array_equal(again.probs, first.probs), counter
        assert dev.counters["received.model"] == 5  # the four forged ones never reached the installer
        # the channel still works: the genuine v2 is installed
        bus.send(push_model(core, artifact(2, seed=2), max_packet=600))
        _until(lambda: dev.model is not None and dev.model.version == 2, "v2 installed")
        pred = dev.predict(rec)
        assert isinstance(pred, Prediction)
        assert np.allclose(pred.probs, reference(SAMPLE, INPUTS, 4, seed=2, masks=True), atol=1e-5)
    finally:
        dev.close(5)


def test_the_users_callback_sees_the_model_too_and_unsigned_is_fine_without_a_key(
        tmp_path: Path, mosquitto_addr: BrokerAddress, edge_keys: dict, bus: EdgePublisher) -> None:
    """A device given no edge key reads a signed model unverified (SPEC §3, "Signed messages")."""
    core = make_core(tmp_path, mosquitto_addr, edge_keys)
    got: list[Kind] = []
    arrived = threading.Event()
    dev = DeviceClient(core.site, "gw-3", mosquitto_addr, store_path=tmp_path / "q.sqlite",
                       model_dir=tmp_path / "models",
                       on_downlink=lambda k, m: (got.append(k), arrived.set()))
    register(core, "gw-3", replace(toy_profile("gw-3"), local_model=True))
    try:
        assert dev.connect(10)
        time.sleep(0.3)
        bus.send(push_model(core, artifact(1, seed=1)))
        _until(lambda: dev.model is not None and dev.model.version == 1, "v1 installed")
        assert got == [Kind.MODEL]  # the user's callback sees the model message too
    finally:
        dev.close(5)


def test_the_edges_real_exported_model_predicts_on_the_device_as_the_edge_does(
        tmp_path: Path, mosquitto_addr: BrokerAddress, edge_keys: dict, bus: EdgePublisher) -> None:
    """A real edge trainer (tiny backbone, LoRA, a few steps), its real ONNX export (megace_model.onnx), pushed
    signed and chunked over Mosquitto: the device's local predictions match the trainer's torch ones."""
    import torch  # the edge's side of this test (the device's side stays torch-free)

    from edge_agent.checkpoints import build_trainer
    from edge_agent.training.toy_task import ToyTask
    from megace_model.onnx import build_artifact

    torch.set_num_threads(1)
    core = make_core(tmp_path, mosquitto_addr, edge_keys, max_packet=64 * 1024)
    core.trainer = trainer = build_trainer(core.config)
    task = ToyTask(core.config.model, seed=3)
    for s in task.samples(64):
        trainer.add_sample(s)
    trainer.train_round(steps=3, batch_size=16)
    held_out = task.samples(12)
    art = build_artifact(trainer.model, core.config.model, held_out[:4], version=2)
    assert art.parity < 1e-4
    dev_id = f"gw-{uuid.uuid4().hex[:6]}"
    dev = DeviceClient(core.site, dev_id, mosquitto_addr, store_path=tmp_path / "q.sqlite",
                       model_dir=tmp_path / "models", edge_key=edge_keys["pub"])
    try:
        assert dev.connect(10)
        dev.register(toy_profile(dev_id))
        register(core, dev_id, replace(toy_profile(dev_id), local_model=True))
        out = push_model(core, art)
        assert len(out) > 1 and all("/chunk/" in o.topic for o in out)  # bigger than one 64 KiB packet
        bus.send(out)
        _until(lambda: dev.model is not None and dev.model.version == 2, "the exported model installed", 60)
        for i, s in enumerate(held_out):
            pred = dev.predict(FeatureRecord(dev_id, i, s["modalities"]))
            label, probs = trainer.predict(s)
            assert isinstance(pred, Prediction) and pred.label == label
            assert np.abs(pred.probs - probs).max() < 1e-4
    finally:
        dev.close(5)


async def test_publish_model_paces_a_model_into_a_small_queue_without_dropping_and_refuses_one_too_large(
        tmp_path: Path, edge_keys: dict) -> None:
    import asyncio

    from broker.metrics import Counters
    from edge_agent.downlinks import DownlinkQueue
    from edge_agent.model_push import publish_model

    core = make_core(tmp_path, NOWHERE, edge_keys, max_packet=512)
    for name in ("p1", "p2", "p3"):
        register(core, name, replace(toy_profile(name), local_model=True))
    art = artifact(4, seed=2)
    per_device = -(-len(art.data) // 400)  # at least this many chunks of a 512-byte packet each
    queue = DownlinkQueue(Counters(), maxsize=per_device + 8)  # room for one device's copy at a time
    taken: list[Outgoing] = []

    async def drain() -> None:  # a slow broker connection: one message per tick
        while True:
            taken.extend(queue._queue.get_nowait() for _ in range(min(queue.qsize(), 4)))
            await asyncio.sleep(0.001)

    consumer = asyncio.create_task(drain())
    try:
        assert await publish_model(core, art, queue, max_bytes=len(art.data)) == 3
        while not queue.empty():
            await asyncio.sleep(0.01)
    finally:
        consumer.cancel()
    assert queue.counters["downlink_dropped"] == 0
    got = opened(core, edge_keys, taken)
    assert sorted(d for d, k, _, _ in got if k is Kind.MODEL) == ["p1", "p2", "p3"]
    assert all(ModelUpdate.from_body(b).data == art.data for _, _, _, b in got)
    # one byte over the cap: nothing is queued, devices keep what they hold, and new registrations get nothing
    bigger = artifact(5, seed=3)
    assert await publish_model(core, bigger, queue, max_bytes=len(bigger.data) - 1) == 0
    assert queue.empty() and core.model_update is None and core.counters["model_push.skipped.too_large"] == 1
    assert push_to_device(core, "p1") == []
