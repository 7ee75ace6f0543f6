"""ONNX at the edge: the merged personalized model exported, checked against torch, written atomically, served.

Expectations are computed here, independently of ``megace_model.onnx``: torch probabilities by a plain forward
of the unmerged peft model (collate, eval, softmax), onnxruntime outputs from a session this file opens on the
exported bytes with a feed it pads itself.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import resource
import signal
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from broker import topics
from broker.address import BrokerAddress
from broker.metrics import Counters
from broker.wire import GlobalAdapter, Kind, encode_envelope
from edge_agent.checkpoints import build_trainer
from edge_agent.core import EdgeCore
from edge_agent.onnx_serving import OnnxServing
from edge_agent.serving import InferenceServer, make_predictor
from edge_agent.training.toy_task import ToyTask, toy_config
from megace_model.adapters import build_edge_model, personal_state, shared_state
from megace_model.batch import collate
from megace_model.onnx import build_artifact, onnx_feed, parity, read_artifact, session, write_artifact
from tests.support.collector import Collector
from tests.support.edge_testkit import Device, edge_config, eventually, record, running, uid

torch.set_num_threads(1)
NOWHERE = BrokerAddress("127.0.0.1", 1)
TOL = 1e-4


def torch_reference(model: torch.nn.Module, samples: list[dict[str, Any]], config: Any) -> np.ndarray:
    """Probabilities of the unmerged peft model itself (what torch serving computes)."""
    model.eval()
    with torch.no_grad():
        batch = collate(samples, config, with_labels=False)
        return torch.softmax(model(**batch.model_inputs()).logits, dim=-1).numpy()


def own_feed(samples: list[dict[str, Any]], config: Any) -> dict[str, np.ndarray]:
    """The padded arrays, built here with numpy: last max_tokens tokens, 1-D arrays as one token."""
    feed: dict[str, np.ndarray] = {}
    for m in config.modality_names:
        spec = config.modalities[m]
        x = np.zeros((len(samples), spec.max_tokens, spec.token_dim), np.float32)
        mask = np.zeros((len(samples), spec.max_tokens), bool)
        for i, s in enumerate(samples):
            if m in s["modalities"]:
                a = np.atleast_2d(np.asarray(s["modalities"][m], np.float32))[-spec.max_tokens :]
                x[i, : len(a)], mask[i, : len(a)] = a, True
        feed[f"features.{m}"], feed[f"token_mask.{m}"] = x, mask
    return feed


def run_onnx(data: bytes, samples: list[dict[str, Any]], config: Any) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # as the edge serves it (bit-level comparisons below)
    sess = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    return sess.run(["probs"], own_feed(samples, config))[0]


def moved(model: Any, seed: int) -> Any:
    """LoRA B (zero at init) and the head's linear layer set to random values: merged and base differ visibly."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or ".head.1." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.05 if "lora_B" in name else 0.5))
    return model


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    config = edge_config(tmp_path_factory.mktemp("onnx") / "state", NOWHERE)
    trainer = build_trainer(config)
    task = ToyTask(config.model, seed=4)
    for s in task.samples(80):
        trainer.buffer.add("d", s["modalities"], int(s["label"]))
    trainer.train_round(steps=8, batch_size=16)
    probe = [{"modalities": s["modalities"]} for s in ToyTask(config.model, seed=9).samples(33)]
    return config, trainer, probe


def test_tiny_export_matches_the_unmerged_peft_model_at_any_batch_size(trained) -> None:  # type: ignore[no-untyped-def]
    config, trainer, probe = trained
    model = trainer.model
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    art = build_artifact(model, config.model, probe[:16], version=7)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the trainer's model was written"
    assert any(".lora_A." in n for n, _ in model.named_parameters()), "the trainer's model lost its LoRA layers"
    assert any(float(t.abs().max()) > 0 for k, t in shared_state(model).items() if "lora_B" in k)
    for n in (1, 16, 33):  # dynamic batch axis
        got = run_onnx(art.data, probe[:n], config.model)
        want = torch_reference(model, probe[:n], config.model)
        assert got.shape == (n, 4) and np.abs(got - want).max() < TOL
    assert 0 <= art.parity < TOL and art.version == 7 and art.classes == 4
    assert art.inputs == {"env": [1, 8], "imu": [4, 6]}
    # the LoRA update is in the graph: the base model without it answers differently
    with model.disable_adapter():
        base = torch_reference(model, probe, config.model)
    assert np.abs(run_onnx(art.data, probe, config.model) - base).max() > 1e-3


def test_minilm_export_matches_the_unmerged_peft_model() -> None:
    config = toy_config(backbone="minilm")
    model = moved(build_edge_model(config), seed=1)
    samples = [{"modalities": s["modalities"]} for s in ToyTask(config, seed=3).samples(12)]
    art = build_artifact(model, config, samples, version=1)
    got = run_onnx(art.data, samples, config)
    want = torch_reference(model, samples, config)
    print(f"MiniLM parity {np.abs(got - want).max():.3g}, {len(art.data) / 1e6:.1f} MB")
    assert np.abs(got - want).max() < TOL and art.parity < TOL
    assert np.abs(got - want.mean(0)).max() > 1e-3  # the answers depend on the inputs (not a constant graph)


def test_the_personal_head_is_in_the_graph(trained) -> None:  # type: ignore[no-untyped-def]
    config, trainer, probe = trained
    edge_a = trainer.model
    edge_b = copy.deepcopy(edge_a)
    with torch.no_grad():
        edge_b.get_base_model().head[1].weight.mul_(-1.5)  # same shared adapter, another personal head
    assert all(torch.equal(v, shared_state(edge_b)[k]) for k, v in shared_state(edge_a).items())
    out_a = run_onnx(build_artifact(edge_a, config.model, probe, version=1).data, probe, config.model)
    out_b = run_onnx(build_artifact(edge_b, config.model, probe, version=1).data, probe, config.model)
    assert np.abs(out_a - torch_reference(edge_a, probe, config.model)).max() < TOL
    assert np.abs(out_b - torch_reference(edge_b, probe, config.model)).max() < TOL
    assert np.abs(out_a - out_b).max() > 1e-2


def test_the_feed_pads_like_collate_and_refuses_what_collate_refuses(trained) -> None:  # type: ignore[no-untyped-def]
    from megace_model.errors import SampleError

    config, _, _ = trained
    rng = np.random.default_rng(0)
    samples = [
        {"modalities": {"imu": rng.normal(size=(6, 6)).astype(np.float32)}},  # longer than 4: last 4 kept
        {"modalities": {"env": rng.normal(size=8).astype(np.float32)}},  # 1-D: one token
        {"modalities": {"imu": rng.normal(size=(2, 6)), "env": rng.normal(size=(1, 8))}},
    ]
    feed, want = onnx_feed(samples, config.model), own_feed(samples, config.model)
    assert set(feed) == set(want) and all(np.array_equal(feed[k], want[k]) for k in want)
    assert feed["token_mask.imu"].dtype == np.bool_ and feed["features.env"].dtype == np.float32
    with pytest.raises(SampleError):
        onnx_feed([{"modalities": {"imu": np.zeros((2, 5), np.float32)}}], config.model)


def test_written_atomically_with_its_sha256_and_a_failed_export_leaves_the_file(trained, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config, trainer, probe = trained
    art = build_artifact(trainer.model, config.model, probe[:8], version=2)
    path = write_artifact(art, tmp_path / "export")
    data = path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == art.sha256 and data == art.data
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.json", "model.onnx"]  # no tmp file left
    meta = json.loads((path.parent / "model.json").read_text())
    assert meta["sha256"] == art.sha256 and meta["version"] == 2 and meta["bytes"] == len(data)
    assert read_artifact(path.parent) == art
    # an export that fails (the exporter refuses opset 1) raises before anything is written
    other = moved(copy.deepcopy(trainer.model), seed=5)
    with pytest.raises(Exception, match=r"(?i)opset"):
        build_artifact(other, config.model, probe[:8], version=3, opset=1)
    assert path.read_bytes() == data
    # a write that fails half way (the process may write files of at most 64 KB) leaves the previous files
    # as they were and removes its partial tmp file
    newer = build_artifact(other, config.model, probe[:8], version=3)
    assert newer.sha256 != art.sha256 and len(newer.data) > 64 * 1024
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the signal
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, limits[1]))
    try:
        with pytest.raises(OSError):
            write_artifact(newer, path.parent)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert path.read_bytes() == data and read_artifact(path.parent).version == 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.json", "model.onnx"]
    # and a corrupted file is detected by its sha256
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ValueError, match="sha256"):
        read_artifact(path.parent)


def test_parity_detects_weights_that_changed_after_the_export(trained) -> None:  # type: ignore[no-untyped-def]
    config, trainer, probe = trained
    model = copy.deepcopy(trainer.model)
    sess = session(build_artifact(model, config.model, probe, version=1).data)
    assert parity(sess, model, probe, config.model) < TOL
    with torch.no_grad():
        model.get_base_model().head[1].bias.add_(torch.tensor([1.0, -1.0, 0.0, 0.0]))
    assert parity(sess, model, probe, config.model) > 1e-2


def server_for(config: Any, trainer: Any) -> tuple[InferenceServer, Counters]:
    counters = Counters()
    server = InferenceServer(EdgeCore(config, counters, trainer), lambda out: None, queue=8, batch=8)
    server.predictor = make_predictor(trainer, config, 0)
    return server, counters


async def test_a_parity_failure_keeps_torch_and_says_why(trained, tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    config, trainer, _ = trained
    from edge_agent.config import EdgeConfig, deep_merge

    strict = EdgeConfig.from_dict(
        deep_merge(
            config.to_dict(), {"state_dir": str(tmp_path / "s"), "training": {"onnx": "on", "onnx_parity_tol": 0.0}}
        )
    )
    server, counters = server_for(strict, trainer)
    shared, personal = shared_state(trainer.model), personal_state(trainer.model)
    # independently: on the held-out samples the check uses, onnxruntime and torch differ by float rounding
    held = [{"modalities": s.as_sample()["modalities"]} for s in trainer.split()[1][-32:]]
    diff = np.abs(
        run_onnx(build_artifact(trainer.model, config.model, held, version=0).data, held, config.model)
        - torch_reference(trainer.model, held, config.model)
    ).max()
    assert 0 < diff < TOL
    onnx = OnnxServing(strict, counters, server)
    await server.sync(shared, personal, 0)
    with caplog.at_level(logging.WARNING, logger="edge_agent.onnx_serving"):
        ev = await onnx.refresh(None, trainer, shared, personal, 0)
    assert ev is not None and ev.reason == "parity" and server.onnx is None and onnx.artifact is None
    assert counters["onnx_rejected.parity"] == 1 and counters["onnx_exports"] == 0
    assert any("parity" in r.getMessage() and "serving torch" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "s" / "export").exists()
    assert onnx.metrics()["inference_backend"] == "torch" and onnx.metrics()["onnx_parity"] == pytest.approx(diff)


async def test_serving_switches_by_mode_and_an_export_error_or_a_newer_sync_keeps_torch(
    trained, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    config, trainer, probe = trained
    from edge_agent.config import EdgeConfig, deep_merge

    def cfg(**training: Any) -> EdgeConfig:  # exports back to back: no minimum interval
        return EdgeConfig.from_dict(deep_merge(config.to_dict(), {
            "state_dir": str(tmp_path / "s"), "training": {"onnx_min_interval_s": 0.0, **training}}))

    shared, personal = shared_state(trainer.model), personal_state(trainer.model)
    server, counters = server_for(cfg(onnx="on"), trainer)
    onnx = OnnxServing(cfg(onnx="on"), counters, server)
    await server.sync(shared, personal, 4)
    ev = await onnx.refresh(None, trainer, shared, personal, 4)
    assert ev is not None and ev.reason == "forced" and server.onnx is not None and server.onnx.version == 4
    got = np.stack([p for _, p in server.onnx.predict(probe[:5])])
    assert np.abs(got - torch_reference(trainer.model, probe[:5], config.model)).max() < TOL
    file = tmp_path / "s" / "export" / "model.onnx"
    assert hashlib.sha256(file.read_bytes()).hexdigest() == onnx.artifact.sha256  # type: ignore[union-attr]
    metrics = onnx.metrics()
    assert metrics["inference_backend"] == "onnx" and metrics["model_version"] == 4
    assert metrics["onnx_ms_b1"] > 0 and metrics["torch_ms_b1"] > 0 and metrics["onnx_parity"] < TOL
    # an export error: torch serves, the last good artifact and its file stay
    first, data = onnx.artifact, file.read_bytes()
    onnx.opset = 1
    await server.sync(shared, personal, 5)
    assert server.onnx is None  # a sync always hands serving back to torch first
    ev = await onnx.refresh(None, trainer, shared, personal, 5)
    assert ev is not None and ev.reason == "export" and "opset" in ev.detail.lower()
    assert server.onnx is None and onnx.artifact is first and file.read_bytes() == data
    assert counters["onnx_rejected.export"] == 1
    # the export is of the tensors the serving copy was synced to, not of whatever the trainer holds
    onnx.opset = 17
    other = moved(copy.deepcopy(trainer.model), seed=8)
    synced_shared, synced_personal = shared_state(other), personal_state(other)
    ev = onnx.evaluate(trainer, synced_shared, synced_personal, 6)
    assert ev.predictor is not None
    got = np.stack([p for _, p in ev.predictor.predict(probe[:8])])
    assert np.abs(got - torch_reference(other, probe[:8], config.model)).max() < TOL
    assert np.abs(got - torch_reference(trainer.model, probe[:8], config.model)).max() > 1e-3
    # an export made before a newer sync is dropped
    generation = server.generation
    ev = onnx.evaluate(trainer, shared, personal, 6, generation)
    await server.sync(shared, personal, 7)
    onnx.install(ev, generation)
    assert server.onnx is None and onnx.artifact is first and counters["onnx_stale"] == 1
    # auto chooses by the batch-1 timing it recorded; with an inference process it keeps torch
    auto = OnnxServing(cfg(onnx="auto"), counters, server)
    ev = auto.evaluate(trainer, shared, personal, 7)
    assert ev.backend == ("onnx" if ev.timings["onnx_ms_b1"] < ev.timings["torch_ms_b1"] else "torch")
    assert (
        OnnxServing(cfg(onnx="auto", inference_process=True), counters, server)
        .evaluate(trainer, shared, personal, 7)
        .reason
        == "inference_process"
    )
    off = OnnxServing(cfg(onnx="off"), counters, server)
    assert await off.refresh(None, trainer, shared, personal, 7) is None and off.artifact is None


@pytest.mark.parametrize("process", [False, True], ids=["thread", "process"])
async def test_an_agent_exports_after_a_round_and_a_global_and_answers_from_the_chosen_backend(
    fresh_mosquitto, tmp_path: Path, process: bool
) -> None:
    addr = BrokerAddress(fresh_mosquitto.host, fresh_mosquitto.port)
    config = edge_config(tmp_path / "state", addr, {"training": {"onnx": "auto", "inference_process": process,
                                                                  "onnx_min_interval_s": 0.0}})
    task = ToyTask(config.model, seed=6)
    probe = task.sample(label=1)
    export = tmp_path / "state" / "export"

    async def ask(dev: Device, sample_id: int) -> Any:
        await dev.infer(record(dev.id, sample_id, probe, label=False))
        return (
            await eventually(
                lambda: [p for p in dev.received(Kind.PREDICTION) if p.sample == sample_id],
                what=f"prediction {sample_id}",
            )
        )[0]

    def check_backend(agent: Any, pred: Any, version: int) -> None:
        """The answer is the backend the metrics name: bit for bit onnxruntime's (single request: batch 1),
        or torch's (bit for bit in this process; within float noise from the inference process)."""
        backend = agent.metrics()["inference_backend"]
        sample = [{"modalities": probe["modalities"]}]
        by_onnx = run_onnx((export / "model.onnx").read_bytes(), sample, config.model)[0]
        by_torch = torch_reference(agent.trainer.model, sample, config.model)[0]
        assert pred.model_version == version
        assert np.abs(by_onnx - by_torch).max() < TOL
        if backend == "onnx":
            assert np.array_equal(pred.probs, by_onnx)
        elif process:
            np.testing.assert_allclose(pred.probs, by_torch, atol=1e-5)
        else:
            assert np.array_equal(pred.probs, by_torch)

    async with running(config) as agent:
        dev = await Device(config.site, uid("dev"), addr, tmp_path).start()
        try:
            await eventually(lambda: dev.received(Kind.CONFIG), what="config")
            before = await ask(dev, 1)
            assert agent.model_artifact is None and agent.metrics()["inference_backend"] == "torch"
            await dev.publish([record(dev.id, i + 10, s) for i, s in enumerate(task.samples(40))])
            await eventually(lambda: agent.model_artifact is not None, 60, "export after the round")
            art = agent.model_artifact
            assert hashlib.sha256((export / "model.onnx").read_bytes()).hexdigest() == art.sha256
            metrics = agent.metrics()
            assert metrics["round"] == 1 and metrics["onnx_exports"] == 1 and metrics["onnx_parity"] < TOL
            assert metrics["onnx_ms_b1"] > 0 and metrics["torch_ms_b1"] > 0 and metrics["model_version"] == 0
            if process:  # auto keeps torch in the inference process; the export is made all the same
                assert (metrics["inference_backend"], metrics["onnx_reason"]) == ("torch", "inference_process")
            else:
                faster = metrics["onnx_ms_b1"] < metrics["torch_ms_b1"]
                assert (metrics["inference_backend"], metrics["onnx_reason"]) == (
                    ("onnx", "faster") if faster else ("torch", "slower")
                )
            after = await ask(dev, 2)
            assert np.abs(after.probs - before.probs).max() > 1e-4  # the round changed the served model
            check_backend(agent, after, 0)
            # a global adapter: applied, exported again, served at its version
            tensors = {
                k: np.random.default_rng(0).normal(scale=0.3, size=tuple(v.shape)).astype(np.float32)
                for k, v in agent.trainer.shared_state().items()
            }
            glob = GlobalAdapter(
                version=3,
                base_model=agent.trainer.fingerprint,
                strategy="fedavg",
                rank=8,
                alpha=16.0,
                tensors=tensors,
                contributors=["x"],
            )
            with Collector(addr, "unused/#") as pub:
                pub.client.publish(
                    topics.global_down(), encode_envelope(Kind.GLOBAL, "cloud", 3, glob.to_body()), qos=1
                ).wait_for_publish(5)
            await eventually(
                lambda: agent.model_artifact is not None and agent.model_artifact.global_version == 3,
                60,
                "export after the global",
            )
            assert agent.model_artifact.sha256 != art.sha256 and agent.counters["onnx_exports"] == 2
            # the model's own version only grows (devices accept only a higher one), apart from the global's
            assert (art.version, agent.model_artifact.version) == (1, 2)
            check_backend(agent, await ask(dev, 3), 3)
        finally:
            await dev.close()


async def test_a_restarted_edge_keeps_its_export_for_devices_and_its_versions_keep_growing(
    trained, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    config, trainer, _probe = trained
    from edge_agent.config import EdgeConfig, deep_merge

    def cfg(**over: Any) -> EdgeConfig:  # exports back to back: no minimum interval
        base = {"state_dir": str(tmp_path / "s"), "training": {"onnx_min_interval_s": 0.0}}
        return EdgeConfig.from_dict(deep_merge(deep_merge(config.to_dict(), base), over))

    shared, personal = shared_state(trainer.model), personal_state(trainer.model)
    server, counters = server_for(cfg(training={"onnx": "on"}), trainer)
    first = OnnxServing(cfg(training={"onnx": "on"}), counters, server)
    assert first.artifact is None and first.next_version == 1
    await server.sync(shared, personal, 6)
    for _ in range(2):  # two exports under the same global: two model versions, one global version
        await first.refresh(None, trainer, shared, personal, 6)
    assert first.artifact is not None and (first.artifact.version, first.artifact.global_version) == (2, 6)
    # a restart reads the last export back (devices registering before the next round get it) and goes on
    again = OnnxServing(cfg(training={"onnx": "on"}), Counters(), server)
    assert again.artifact == first.artifact and again.next_version == 3
    # an export made for another model (other classes) is not offered to devices, nor is anything with ONNX off
    other = cfg(training={"onnx": "on"}, model={"num_classes": config.model.num_classes + 1})
    assert OnnxServing(other, Counters(), server).artifact is None
    assert OnnxServing(cfg(training={"onnx": "off"}), Counters(), server).artifact is None
    # a damaged file on disk is refused by its sha256, not served to devices
    model_file = tmp_path / "s" / "export" / "model.onnx"
    model_file.write_bytes(model_file.read_bytes()[:-1])
    broken = OnnxServing(cfg(training={"onnx": "on"}), Counters(), server)
    assert broken.artifact is None and broken.next_version == 3  # still above what devices may hold


def test_the_readme_onnxruntime_snippet_gives_the_edge_model_s_predictions(  # type: ignore[no-untyped-def]
    trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's plain-onnxruntime example, run as written against a real export, matches torch."""
    config, trainer, probe = trained
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("**The edge's ONNX inference model.**", 1)[1]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    write_artifact(build_artifact(trainer.model, config.model, probe[:4], version=1), tmp_path / "state" / "export")
    monkeypatch.chdir(tmp_path)
    imu = np.asarray(probe[1]["modalities"]["imu"], np.float32)
    longer = np.concatenate([imu, imu[::-1], imu])  # more tokens than the model takes: the newest are kept
    assert len(longer) > config.model.modalities["imu"].max_tokens
    for sample in (probe[0], {"modalities": {"imu": imu[:2]}}, {"modalities": {"imu": longer}}):
        scope: dict[str, Any] = {"sample": {m: np.asarray(a, np.float32) for m, a in sample["modalities"].items()}}
        exec(compile(snippet, "README.md", "exec"), scope)
        want = torch_reference(trainer.model, [sample], config.model)
        assert np.abs(scope["probs"] - want).max() < TOL


async def test_every_outcome_of_a_refresh_is_reported_exactly(trained, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Metrics name each timing and the versions; a slower ONNX is exported but not served; a stale evaluation
    stops before exporting; a refused write keeps the last artifact; the parity bound is inclusive."""
    config, trainer, _ = trained
    from edge_agent.config import EdgeConfig, deep_merge

    def cfg(**training: Any) -> EdgeConfig:
        return EdgeConfig.from_dict(deep_merge(config.to_dict(), {"state_dir": str(tmp_path / "s"),
                                                                   "training": training}))

    shared, personal = shared_state(trainer.model), personal_state(trainer.model)
    server, counters = server_for(cfg(onnx="auto"), trainer)
    onnx = OnnxServing(cfg(onnx="auto"), counters, server)
    await server.sync(shared, personal, 3)
    ev = onnx.evaluate(trainer, shared, personal, 3, server.generation)
    t = ev.timings
    assert set(t) == {"torch_ms_b1", "torch_ms_b32", "parity", "onnx_ms_b1", "onnx_ms_b32"}
    assert all(t[k] > 0 for k in ("torch_ms_b1", "torch_ms_b32", "onnx_ms_b1", "onnx_ms_b32"))
    assert ev.export_s is not None and 0 < ev.export_s < 60 and ev.artifact is not None
    ev.backend, ev.reason = "torch", "slower"  # what auto installs when onnxruntime measured slower
    onnx.install(ev, server.generation)
    assert server.onnx is None and onnx.artifact is ev.artifact and counters["onnx_exports"] == 1
    m = onnx.metrics()
    assert m == {
        "inference_backend": "torch", "model_version": 3, "onnx_mode": "auto", "onnx_reason": "slower",
        "onnx_version": ev.artifact.version, "onnx_parity": t["parity"], "onnx_ms_b1": t["onnx_ms_b1"],
        "torch_ms_b1": t["torch_ms_b1"], "onnx_ms_b32": t["onnx_ms_b32"], "torch_ms_b32": t["torch_ms_b32"],
        "onnx_export_s": ev.export_s,
    }
    # stale before it starts: nothing exported, no version spent
    versions = onnx.next_version
    stale = onnx.evaluate(trainer, shared, personal, 3, server.generation - 1)
    assert (stale.reason, stale.artifact, stale.timings, onnx.next_version) == ("stale", None, {}, versions)
    # the parity bound is inclusive: a tolerance equal to the measured difference accepts the export
    onnx.tol = t["parity"]
    again = onnx.evaluate(trainer, shared, personal, 3, server.generation)
    assert again.timings["parity"] == t["parity"] and again.reason in ("faster", "slower")
    # a refused write (the export folder is a file): torch serves, the last artifact stays, reason and counter
    kept = onnx.artifact
    onnx.directory = tmp_path / "blocked"
    onnx.directory.write_bytes(b"not a folder")
    refused = onnx.evaluate(trainer, shared, personal, 3, server.generation)
    assert refused.reason == "write" and refused.detail.split(":")[0] in ("FileExistsError", "NotADirectoryError")
    onnx.install(refused, server.generation)
    assert onnx.artifact is kept and counters["onnx_rejected.write"] == 1 and server.onnx is None


def test_check_samples_are_held_out_data_else_seeded_synthetic(trained, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from edge_agent.onnx_serving import check_samples, synthetic_samples

    config, trainer, _ = trained
    _, held = trainer.split()
    got = check_samples(trainer, 5)
    assert len(got) == 5 and all(
        all(np.array_equal(g["modalities"][m], s.modalities[m]) for m in s.modalities)
        for g, s in zip(got, held[-5:], strict=True))
    fresh = build_trainer(edge_config(tmp_path / "empty", NOWHERE))  # a global applied before any data arrived
    made = check_samples(fresh, 7)
    want = synthetic_samples(fresh.config, 7)
    assert len(made) == 7 and all(set(a["modalities"]) == set(b["modalities"]) and all(
        np.array_equal(a["modalities"][m], b["modalities"][m]) for m in a["modalities"])
        for a, b in zip(made, want, strict=True))
    one, two, other = synthetic_samples(config.model, 40, 1), synthetic_samples(config.model, 40, 1), \
        synthetic_samples(config.model, 40, 2)
    assert len(one) == 40 and all(np.array_equal(a["modalities"][m], b["modalities"][m])
                                  for a, b in zip(one, two, strict=True) for m in a["modalities"])
    assert any(set(a["modalities"]) != set(b["modalities"]) or any(
        not np.array_equal(a["modalities"][m], b["modalities"][m]) for m in a["modalities"])
        for a, b in zip(one, other, strict=True))
    seen_tokens = set()
    for s in one:
        assert s["modalities"] and set(s["modalities"]) <= set(config.model.modality_names)
        for m, a in s["modalities"].items():
            spec = config.model.modalities[m]
            assert a.dtype == np.float32 and a.shape[1] == spec.token_dim and 1 <= a.shape[0] <= spec.max_tokens
            seen_tokens.add((m, a.shape[0]))
    assert any(len(s["modalities"]) < len(config.model.modality_names) for s in one)  # subsets, as devices send
    assert len(seen_tokens) > len(config.model.modality_names)  # token counts vary
    onnx_feed(one, config.model)  # every synthetic sample collates


async def test_a_global_arriving_while_the_edge_shuts_down_is_applied_and_exported_before_the_pools_stop(
    fresh_mosquitto, tmp_path: Path
) -> None:
    """A global handled during the final checkpoint (the connection still delivers) is applied, synced and
    exported while the training and inference pools still run: before, its task met shut-down pools."""
    addr = BrokerAddress(fresh_mosquitto.host, fresh_mosquitto.port)
    config = edge_config(tmp_path / "state", addr, {"training": {"onnx": "on"}})
    async with running(config) as agent:
        tensors = {k: np.random.default_rng(1).normal(scale=0.2, size=tuple(v.shape)).astype(np.float32)
                   for k, v in agent.trainer.shared_state().items()}
        glob = GlobalAdapter(version=5, base_model=agent.trainer.fingerprint, strategy="fedavg", rank=8, alpha=16.0,
                             tensors=tensors, contributors=["x"])
        payload = encode_envelope(Kind.GLOBAL, "cloud", 5, glob.to_body())
        final_checkpoint = agent._checkpoint

        async def checkpoint_with_a_late_global(*args: Any, **kwargs: Any) -> bool:
            if agent._closing:  # the shutdown's own checkpoint: a global comes in meanwhile
                agent.handle(topics.global_down(), payload)
            return await final_checkpoint(*args, **kwargs)

        agent._checkpoint = checkpoint_with_a_late_global  # type: ignore[method-assign]
    assert agent.state.global_version == 5 and agent.counters["globals_applied"] == 1
    assert agent.counters["internal_errors"] == 0
    assert agent.model_artifact is not None and agent.model_artifact.global_version == 5


async def test_exports_closer_than_the_minimum_interval_are_deferred_and_torch_serves_meanwhile(  # type: ignore[no-untyped-def]
    trained, tmp_path: Path
) -> None:
    config, trainer, _ = trained
    from edge_agent.config import EdgeConfig, deep_merge

    cfg = EdgeConfig.from_dict(deep_merge(config.to_dict(), {
        "state_dir": str(tmp_path / "s"), "training": {"onnx": "on", "onnx_min_interval_s": 60.0}}))
    shared, personal = shared_state(trainer.model), personal_state(trainer.model)
    server, counters = server_for(cfg, trainer)
    onnx = OnnxServing(cfg, counters, server)
    await server.sync(shared, personal, 1)
    assert (await onnx.refresh(None, trainer, shared, personal, 1)) is not None and server.onnx is not None
    first = onnx.artifact
    await server.sync(shared, personal, 2)  # the next round, seconds later: no export, torch serves it
    assert await onnx.refresh(None, trainer, shared, personal, 2) is None
    assert server.onnx is None and onnx.artifact is first and counters["onnx_deferred"] == 1
    assert counters["onnx_exports"] == 1
    onnx._last_export_t -= 61.0  # a minute later the next round exports again
    await server.sync(shared, personal, 3)
    assert (await onnx.refresh(None, trainer, shared, personal, 3)) is not None and server.onnx is not None
    assert onnx.artifact is not first and counters["onnx_exports"] == 2
