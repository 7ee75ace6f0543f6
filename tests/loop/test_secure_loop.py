"""``megace run --secure``: the shrunken closed loop on a private Mosquitto with TLS, identities, ACLs, signatures.

The same small loop as ``test_closed_loop`` (tiny model, 2 edges x 2 devices, 2 rounds) runs twice with the
same seed: once secured, once on the anonymous loopback demo bus (a plain Mosquitto). The secured run
must complete like the plain one with no signature rejected. While its first round is reported, the
test probes the loop's own broker from outside: anonymous clients (with and without TLS, and on the
certificate listener without a certificate) are refused, and a provisioned device that pins the wrong
edge key gets no prediction while the same device pinning its edge's key does. Each of these fails if
the loop quietly ran without TLS, ACLs or signatures.
"""

from __future__ import annotations

import ssl
import threading
import time
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from broker.wire import CapabilityProfile, FeatureRecord, Kind, ModalityProfile
from device_sdk import DeviceClient
from megace.loop.results import LoopResult, RoundRecord
from megace.loop.runner import ClosedLoop, run_loop
from megace.loop.secure import MONITOR, SecureBus, cloud_identity, edge_identity, signature_rejections
from megace.loop.settings import LoopSettings
from megace.provision.identity import Identity, Role
from megace.provision.store import Store

ROUNDS = 2
EDGES = 2
DEVICES_PER_EDGE = 2
PROBE = Identity(Role.DEVICE, "probe", "site-0")  # provisioned by the test before the loop: --state-dir reuse


def _settings(out: Path, **kw: Any) -> LoopSettings:
    return LoopSettings(
        dataset="basicmotions", dataset_options={"augment": 0}, max_samples=None, edges=EDGES,
        devices_per_edge=DEVICES_PER_EDGE, alpha=1.0, ranks=(4, 2), rounds=ROUNDS, steps_per_round=10,
        strategy="modality-aware", broker_kind="mosquitto", out=out, round_timeout_s=60.0,
        services_timeout_s=60.0, time_limit_s=150.0, **kw,
    )


@dataclass
class Probes:
    connects: dict[str, str] = field(default_factory=dict)  # attempt -> "connected" / "refused: ..."
    wrong_key: dict[str, Any] = field(default_factory=dict)
    right_key: dict[str, Any] = field(default_factory=dict)
    error: str = ""


@dataclass
class Runs:
    secure: LoopResult
    plain: LoopResult
    probes: Probes
    state_dir: Path
    out: Path


def _try_connect(host: str, port: int, ctx: ssl.SSLContext | None, user: str | None = None,
                 password: str | None = None, wait_s: float = 5.0) -> str:
    """``connected`` only when the broker answers CONNACK 0; anything else says how it was refused."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"intruder-{uuid.uuid4().hex[:6]}",
                    protocol=mqtt.MQTTv311)
    if ctx is not None:
        c.tls_set_context(ctx)
    if user:
        c.username_pw_set(user, password)
    got: dict[str, Any] = {}
    done = threading.Event()

    def on_connect(_c: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        got["rc"] = rc
        done.set()

    c.on_connect = on_connect
    try:
        c.connect(host, port, keepalive=5)
    except (ssl.SSLError, OSError) as exc:
        return f"refused: {type(exc).__name__}: {exc}"
    c.loop_start()
    try:
        done.wait(wait_s)
    finally:
        c.disconnect()
        c.loop_stop()
    rc = got.get("rc")
    if rc is None:
        return "refused: no CONNACK"
    return "connected" if not rc.is_failure else f"refused: CONNACK {rc}"


def _probe_device(loop: ClosedLoop, edge_key: Path, store_path: Path, wait_s: float) -> dict[str, Any]:
    """The provisioned probe device (site-0) registers and asks edge-0 for one prediction."""
    assert loop.secure is not None and loop.secure.broker is not None
    ds = loop.devices[0].test  # a device of edge 0: its modalities are the ones edge-0 serves
    sample = ds[0]
    answers: list[Any] = []
    seen = threading.Event()

    def on_downlink(kind: Kind, msg: Any) -> None:
        if kind is Kind.PREDICTION:
            answers.append(msg)
            seen.set()

    client = DeviceClient("site-0", PROBE.name, loop.secure.broker.address(PROBE.username), on_downlink=on_downlink,
                          store_path=store_path, edge_key=edge_key)
    try:
        assert client.connect(10.0), "the probe device (its own certificate) could not connect"
        mods = dict(sample["modalities"])
        client.register(CapabilityProfile(
            device=PROBE.name, modalities={m: ModalityProfile(shape=spec.shape, dtype="<f4", rate_hz=1.0)
                                           for m, spec in ds.modalities.items()},
            compute={"cpu_cores": 1.0}, sdk_version="probe"))
        time.sleep(0.5)
        client.request_inference(FeatureRecord(PROBE.name, time.time_ns() // 1000, mods))
        seen.wait(wait_s)
        snap = client.counters.snapshot()
    finally:
        client.close(timeout=3.0)
    return {"predictions": len(answers), "counters": snap}


def _probe(loop: ClosedLoop, probes: Probes, tmp: Path) -> None:
    bus = loop.secure
    assert bus is not None and bus.broker is not None
    b = bus.broker
    trusting = ssl.create_default_context(cafile=str(bus.store.ca_dir / "ca.crt"))
    trusting.maximum_version = ssl.TLSVersion.TLSv1_2
    no_verify = ssl.create_default_context()
    no_verify.check_hostname, no_verify.verify_mode = False, ssl.CERT_NONE
    probes.connects = {
        "anonymous over TLS (password listener)": _try_connect(b.host, b.password_port, trusting),
        "anonymous without TLS (password listener)": _try_connect(b.host, b.password_port, None),
        "no certificate (mutual TLS listener)": _try_connect(b.host, b.mtls_port, trusting),
        "anonymous without TLS (mutual TLS listener)": _try_connect(b.host, b.mtls_port, None),
        "monitor name with a wrong password": _try_connect(b.host, b.password_port, no_verify, MONITOR.username,
                                                           "not-the-password"),
        # a positive control: the same helper does report a good connection
        "monitor with its password": _try_connect(b.host, b.password_port, trusting, MONITOR.username,
                                                  bus.address(MONITOR).password),
    }
    # pinning the cloud's key instead of edge-0's: every downlink (config, prediction) must be refused
    probes.wrong_key = _probe_device(loop, bus.public_key(cloud_identity()), tmp / "probe.sqlite", 6.0)
    probes.right_key = _probe_device(loop, bus.device_edge_key(0), tmp / "probe.sqlite", 15.0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    tmp = tmp_path_factory.mktemp("secure-loop")
    state_dir = tmp / "pki"
    store = Store.init(state_dir, ["127.0.0.1"])
    store.add(PROBE, cert=True, password=False)
    probes = Probes()

    out = tmp / "secure"
    loop = ClosedLoop(_settings(out, secure=True, state_dir=state_dir))

    def progress(kind: str, payload: Any) -> None:
        if kind == "round" and isinstance(payload, RoundRecord) and payload.round == 1:
            try:
                _probe(loop, probes, tmp)
            except Exception as exc:  # reported by the tests, not lost in the loop
                probes.error = f"{type(exc).__name__}: {exc}"

    loop.progress = progress
    secure = loop.run()
    plain = run_loop(_settings(tmp / "plain"))
    yield Runs(secure, plain, probes, state_dir, out)


def _final_acc(result: LoopResult) -> float:
    final = result.rounds[-1]
    return sum(round(e.device_acc * e.asked) for e in final.edges) / sum(e.asked for e in final.edges)


@pytest.mark.timeout(300)
def test_the_secure_loop_completes_like_the_plain_one(runs: Runs) -> None:
    sec, plain = runs.secure, runs.plain
    assert len(sec.rounds) == ROUNDS, sec.stopped_because
    assert len(plain.rounds) == ROUNDS, plain.stopped_because
    for e in sec.rounds[-1].edges:
        assert e.asked > 0 and e.answered == e.asked, (e.edge, e.answered, e.asked)
    acc, base = _final_acc(sec), _final_acc(plain)
    # 40 test recordings, 4 classes: both well above chance, and within run-to-run noise of each other
    # (the loop is not bit-reproducible: arrival order and thread timing vary between runs of one seed)
    assert acc >= 0.45 and base >= 0.45, (acc, base)
    assert abs(acc - base) <= 0.3, (acc, base)
    assert sec.global_acc and all(a > 0.25 for a in sec.global_acc.values()), sec.global_acc


def test_the_secure_loop_reports_tls_identities_acls_and_no_rejected_signature(runs: Runs) -> None:
    sec = runs.secure.security
    assert sec["secure"] is True and sec["anonymous"] is False
    assert sec["identities"] == {"cloud": 1, "edge": EDGES, "control": EDGES, "device": EDGES * (DEVICES_PER_EDGE + 1),
                                 "monitor": 1}
    rej = sec["signature_rejections"]
    assert rej["total"] == 0, rej
    assert {"edge-0", "edge-1", "cloud-0", "e0-dev0", "e1-eval"} <= set(rej["by"]), rej
    # the monitor read every upload and every prediction signed: signatures were on, not merely configured
    up_signed, up_all = sec["signed_on_bus"]["uploads"]
    pred_signed, pred_all = sec["signed_on_bus"]["predictions"]
    assert up_all >= EDGES * ROUNDS and up_signed == up_all, sec["signed_on_bus"]
    assert pred_all > 0 and pred_signed == pred_all, sec["signed_on_bus"]
    report = (Path(runs.secure.out_dir) / "report.md")
    from megace.loop.report import write_report

    text = write_report(runs.secure, report.parent).read_text()
    assert "**Bus: secured**" in text and "Signature rejections: **0**" in text


def test_the_plain_loop_is_labelled_the_anonymous_demo(runs: Runs) -> None:
    sec = runs.plain.security
    assert sec["secure"] is False and "anonymous loopback demo" in sec["demo"]
    from megace.loop.report import security_line

    assert security_line(runs.plain).startswith("**Bus: not secured**")


def test_services_were_configured_with_certificates_and_required_signatures(runs: Runs) -> None:
    cfg = runs.out / "config"
    cloud = tomllib.loads((cfg / "cloud.toml").read_text())
    assert cloud["broker"].startswith("mqtts://megace-cloud-cloud-0@") and "cert=" in cloud["broker"]
    assert cloud["signing"]["require"] is True and Path(cloud["signing"]["key_file"]).name == "signing.ed25519"
    assert {e: b["site"] for e, b in cloud["signing"]["edges"].items()} == {"edge-0": "site-0", "edge-1": "site-1"}
    for e in range(EDGES):
        edge = tomllib.loads((cfg / f"edge-{e}.toml").read_text())
        assert edge["broker"].startswith(f"mqtts://megace-edge-edge-{e}@") and "key=" in edge["broker"]
        assert "password" not in edge["broker"]
        assert edge["signing"]["require"] is True
        assert edge["signing"]["trusted_keys"] == [cloud["signing"]["key_file"] + ".pub"]
        # the receiver process logs in as the edge, the agent beside it as the edge's control identity
        assert Path(edge["control_identity"]).name == f"megace-ctl-edge-{e}"
        assert (runs.out / "state" / f"edge-{e}" / "ingest" / "receiver.lock").exists(), "no receiver process ran"


def test_anonymous_and_wrong_credentials_are_refused_by_the_loops_broker(runs: Runs) -> None:
    p = runs.probes
    assert not p.error, p.error
    assert p.connects.pop("monitor with its password") == "connected"
    assert p.connects and all(v.startswith("refused") for v in p.connects.values()), p.connects


def test_a_device_pinning_the_wrong_edge_key_gets_no_prediction(runs: Runs) -> None:
    p = runs.probes
    assert not p.error, p.error
    wrong, right = p.wrong_key, p.right_key
    assert wrong["predictions"] == 0, wrong
    # refused because the edge signed with a key the device does not trust (not because nothing came)
    assert wrong["counters"].get("rejected.UnknownKeyError", 0) >= 1, wrong["counters"]
    assert "received.prediction" not in wrong["counters"], wrong["counters"]
    assert right["predictions"] >= 1, right
    assert not any(k.startswith("rejected.") for k in right["counters"]), right["counters"]


def test_the_state_dir_keeps_its_identities_and_gains_the_loops(runs: Runs) -> None:
    store = Store.open(runs.state_dir)
    names = set(store.entries)
    assert PROBE.username in names and MONITOR.username in names
    assert {edge_identity(e).username for e in range(EDGES)} <= names
    acl = (store.broker_dir / "megace.acl").read_text()
    block = acl.split(f"user {MONITOR.username}\n", 1)[1].split("\n\n", 1)[0]
    assert block.strip().splitlines() == ["topic read megace/v1/#"]  # the monitor reads, never writes
    # a second run on the same folder issues nothing new
    bus = SecureBus(runs.state_dir)
    try:
        bus.provision([MONITOR, cloud_identity(), edge_identity(0), PROBE])
        assert bus.issued == [] and len(bus.reused) == 4
    finally:
        bus.close()
    assert runs.state_dir.exists()


def test_signature_rejections_adds_up_only_signature_errors() -> None:
    got = signature_rejections(
        {"edge-0": {"rejected_by_class": {"UnsignedError": 2, "OversizeError": 5}},
         "edge-1": {"rejected.BadSignatureError": 1}},
        {"cloud-0": {"rejected_reasons": {"unknown_key": 3, "stale": 7}}},
        {"d": {"rejected.ImpersonationError": 1, "rejected.DecodeError": 4}},
    )
    assert got == {"by": {"edge-0": 2, "edge-1": 1, "cloud-0": 3, "d": 1}, "total": 7}


def test_secure_refuses_an_external_broker(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="secure"):
        ClosedLoop(_settings(tmp_path, secure=True, broker_url="mqtt://127.0.0.1:1883"))


def test_the_cli_offers_secure_and_refuses_mixing_it_with_an_external_broker(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from megace.cli import app

    cli = CliRunner()
    shown = cli.invoke(app, ["run", "--help"], terminal_width=200)
    assert shown.exit_code == 0 and "--secure" in shown.output and "--state-dir" in shown.output
    for args in (["--secure", "--broker", "mqtt://127.0.0.1:1883"], ["--secure", "--username", "u"],
                 ["--state-dir", str(tmp_path)]):
        got = cli.invoke(app, ["run", *args, "--out", str(tmp_path / "out")], terminal_width=200)
        assert got.exit_code != 0 and ("--secure" in got.output or "--state-dir" in got.output), (args, got.output)


@pytest.mark.parametrize("mode", ["static", "dynsec"])
def test_the_monitor_identity_reads_the_loops_topics_and_publishes_nothing(tmp_path: Path, mode: str) -> None:
    """The loop's monitor subscribes to every filter it needs (granted under both set-ups) and can write nothing."""
    from megace.loop.monitor import Monitor

    bus = SecureBus(tmp_path / "pki", mode=mode)  # type: ignore[arg-type]
    try:
        bus.provision([MONITOR, Identity(Role.DEVICE, "e0-dev0", "site-0")])
        bus.start()
        a = bus.address(MONITOR)
        filters = Monitor(a, [("site-0", "e0-dev0")]).filters()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="whatever", protocol=mqtt.MQTTv311)
        c.username_pw_set(a.username, a.password)
        c.tls_set_context(a.ssl_context())
        granted: list[int] = []
        done = threading.Event()
        c.on_subscribe = lambda _c, _u, _m, rcs, _p: (granted.extend(int(r.value) for r in rcs), done.set())
        c.connect(a.host, a.port)
        c.loop_start()
        try:
            c.subscribe([(f, 1) for f in filters])
            assert done.wait(5.0)
            assert len(granted) == len(filters) and all(g < 128 for g in granted), (filters, granted)
            c.publish("megace/v1/status/edge/edge-0", b"x", qos=1)
            deadline = time.monotonic() + 5.0
            while c.is_connected() and time.monotonic() < deadline:  # Mosquitto drops a client it denies
                time.sleep(0.05)
            assert not c.is_connected()
        finally:
            c.disconnect()
            c.loop_stop()
    finally:
        bus.close()
