"""Security cost benchmark: Ed25519 message signing and TLS on the device publish path.

Two measurements, each against a baseline taken in the same run (these machines are shared and
noisy: compare the ratios, not absolute times).

1. Signing (``broker.signing``): a MiniLM-sized global adapter and a MiniLM-sized edge upload
   (fp32, the default, and fp16), built as the services build them (``GlobalAdapter`` /
   ``AdapterUpdate`` + ``encode_envelope``), with the tensor names and shapes of the real MiniLM
   shared state (``megace_model.adapters.shared_state``, rank 8; values random, since a fresh
   adapter's ``lora_B`` is all zeros). Per message: bytes, and the median of ``--sign-reps``
   interleaved repetitions of ``Signer.sign`` and ``Verifier.open``, next to the baseline of
   ``encode_envelope`` / ``decode_envelope`` of the same message (the body prebuilt), the
   service path (``to_body`` + encode; decode + ``from_body``) and one SHA-512 of the envelope
   (Ed25519 hashes the message twice to sign, once to verify). A 1 KiB feature envelope shows
   the fixed cost of a signature.
2. TLS: one Mosquitto configured by ``broker.runners.secure`` (static password file + ACL,
   no anonymous access) plus one extra listener without TLS that uses the same password file, ACL
   and ``use_username_as_clientid`` (the secure runner has no plaintext listener; this keeps
   authentication and authorization identical, so only TLS differs). Mosquitto 2.0 reads
   ``tls_version tlsv1.2`` as a minimum: password clients negotiate TLS 1.3, certificate clients
   TLS 1.2 (``BrokerAddress.ssl_context`` caps them); the JSON records protocol and cipher.
   One provisioned device publishes ``--messages`` 1 KiB ``FeatureRecord``s at QoS 1 with
   ``DeviceClient`` (settings as in bench_sdk.py), until every PUBACK is in, over
   (a) password, no TLS, (b) password over TLS, (c) mutual TLS (client certificate).
   The arms are interleaved, their order rotated each repeat; records/s and TLS/plaintext
   ratios per repeat, medians reported. Before timing, an edge subscriber checks that each arm's
   records really pass the ACL (Mosquitto acknowledges a refused QoS 1 publish all the same).

    python bench/bench_security.py [--messages 10000] [--repeats 3] [--sign-reps 200] \
        [--out bench/results/security.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker import topics
from broker.address import BrokerAddress
from broker.runners import find_mosquitto
from broker.runners.ports import free_port, wait_for_port
from broker.runners.secure import SecureMosquitto, secure_config
from broker.signing import BadSignatureError, Signer, Verifier, generate_private_key
from broker.wire import (
    AdapterUpdate,
    FeatureRecord,
    GlobalAdapter,
    Kind,
    decode_envelope,
    encode_envelope,
)
from device_sdk import DeviceClient
from megace.provision import Identity, Role
from megace.provision.store import Store

INFLIGHT = 100
FLOATS = 218  # a 1 KiB feature envelope, as in bench_sdk.py
SITE = "bench"
DEVICE = Identity(Role.DEVICE, "secbench", SITE)
EDGE = Identity(Role.EDGE, "secedge", SITE)
RANK = 8
FINGERPRINT = "f" * 64  # a base-model fingerprint is a hex digest
ARMS = ("plain_password", "tls_password", "mtls")

Tensors = dict[str, np.ndarray]


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ------------------------------------------------------------------------------- 1. signing
def minilm_shapes() -> tuple[dict[str, tuple[int, ...]], str]:
    """Names and shapes of the MiniLM rank-8 shared state (toy modalities, as bench_edge.py uses)."""
    try:
        import torch

        from edge_agent.training.toy_task import toy_config
        from megace_model.adapters import build_edge_model, shared_state

        torch.set_num_threads(1)  # a loaded 2-core box: one thread is faster (FIELD_NOTES)
        model = build_edge_model(toy_config(backbone="minilm", lora_r=RANK, lora_alpha=2 * RANK))
        return {k: tuple(v.shape) for k, v in shared_state(model).items()}, "megace_model MiniLM shared_state"
    except (ImportError, OSError) as exc:  # no torch / no offline MiniLM: the same names, synthesized
        shapes: dict[str, tuple[int, ...]] = {}
        for layer in range(6):
            for proj in ("query", "value"):
                stem = f"base_model.model.backbone.encoder.layer.{layer}.attention.self.{proj}"
                shapes[f"{stem}.lora_A.weight"], shapes[f"{stem}.lora_B.weight"] = (RANK, 384), (384, RANK)
        for modality, dim in (("env", 8), ("imu", 6)):
            stem = f"base_model.model.modality_proj.{modality}"
            shapes[f"{stem}.lora_A.weight"], shapes[f"{stem}.lora_B.weight"] = (RANK, dim), (384, RANK)
        return shapes, f"synthesized ({type(exc).__name__}: {exc})"


def random_tensors(shapes: dict[str, tuple[int, ...]], dtype: type[np.floating[Any]]) -> Tensors:
    rng = np.random.default_rng(7)
    return {k: (rng.standard_normal(s, dtype=np.float32) * 0.02).astype(dtype) for k, s in shapes.items()}


class Message:
    """One message as a service builds it: ``make_body()`` -> ``encode_envelope``; ``parse`` the body back."""

    def __init__(self, name: str, kind: Kind, sender: str, make_body: Callable[[], Any],
                 parse: Callable[[Any], Any]) -> None:
        self.name, self.kind, self.sender, self.make_body, self.parse = name, kind, sender, make_body, parse
        self.body = make_body()
        self.envelope = self.encode()

    def encode(self) -> bytes:
        return encode_envelope(self.kind, self.sender, 42, self.body, ts_ms=1_700_000_000_000)

    def build(self) -> bytes:
        return encode_envelope(self.kind, self.sender, 42, self.make_body(), ts_ms=1_700_000_000_000)


def messages(shapes: dict[str, tuple[int, ...]]) -> list[Message]:
    fp32 = random_tensors(shapes, np.float32)
    fp16 = {k: v.astype(np.float16) for k, v in fp32.items()}
    glob = GlobalAdapter(version=17, base_model=FINGERPRINT, strategy="fedavg", rank=RANK, alpha=float(RANK),
                         tensors=fp32, contributors=[f"megace-edge-e{i}" for i in range(10)])
    upload = AdapterUpdate(edge="megace-edge-e0", site="site-0", seq=42, base_version=17, base_model=FINGERPRINT,
                           rank=RANK, alpha=2.0 * RANK, samples=256, modalities={"env": 256, "imu": 180},
                           tensors=fp32, metrics={"loss": 0.41, "train_acc": 0.88, "steps": 8.0, "duration_s": 9.5})
    upload16 = replace(upload, tensors=fp16)
    arr = np.random.default_rng(0).random(FLOATS, dtype=np.float32)
    record = FeatureRecord("d0", 42, {"accel": arr})
    return [
        Message("global_adapter_fp32", Kind.GLOBAL, "megace-cloud-c", glob.to_body, GlobalAdapter.from_body),
        Message("edge_upload_fp32", Kind.ADAPTER, "megace-edge-e0", upload.to_body, AdapterUpdate.from_body),
        Message("edge_upload_fp16", Kind.ADAPTER, "megace-edge-e0", upload16.to_body, AdapterUpdate.from_body),
        Message("feature_record_1KiB", Kind.FEATURES, "d0", record.to_body, FeatureRecord.from_body),
    ]


def _ms(ns: list[int]) -> float:
    return round(statistics.median(ns) / 1e6, 4)


def bench_signing(msgs: list[Message], reps: int) -> dict[str, Any]:
    signer = Signer(generate_private_key())
    verifier = Verifier([signer.public_key])
    out: dict[str, Any] = {"algorithm": "Ed25519 over DOMAIN + envelope (broker.signing)", "repetitions": reps,
                           "timer": "time.perf_counter_ns, one call per sample; medians", "messages": {}}
    for m in msgs:
        signed = signer.sign(m.envelope)
        assert verifier.open(signed) == m.envelope
        assert m.parse(decode_envelope(m.envelope).body) is not None
        tampered = bytearray(signed)
        tampered[-1] ^= 1
        try:
            verifier.open(bytes(tampered))
            raise AssertionError("a tampered message verified")
        except BadSignatureError:
            pass
        t: dict[str, list[int]] = {k: [] for k in ("encode", "build", "sign", "decode", "parse", "verify", "sha512")}
        clock = time.perf_counter_ns
        for _ in range(reps):  # interleaved: every operation sees the same machine load
            t0 = clock()
            m.encode()
            t1 = clock()
            m.build()
            t2 = clock()
            signer.sign(m.envelope)
            t3 = clock()
            decode_envelope(m.envelope)
            t4 = clock()
            m.parse(decode_envelope(m.envelope).body)
            t5 = clock()
            verifier.open(signed)
            t6 = clock()
            hashlib.sha512(m.envelope).digest()
            t7 = clock()
            for key, dt in zip(t, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, t7 - t6), strict=True):
                t[key].append(dt)
        enc, build, sign, dec, parse, ver, sha = (_ms(t[k]) for k in t)
        out["messages"][m.name] = {
            "envelope_bytes": len(m.envelope), "signed_bytes": len(signed),
            "overhead_bytes": len(signed) - len(m.envelope),
            "tensors": len(m.body.get("tensors", {})) if isinstance(m.body, dict) else 0,
            "sign_ms": sign, "verify_ms": ver,
            "encode_envelope_ms": enc, "decode_envelope_ms": dec,
            "to_body_and_encode_ms": build, "decode_and_from_body_ms": parse,
            "sha512_ms": sha,  # Ed25519 hashes the message twice to sign, once to verify
            "sign_over_encode": round(sign / enc, 3), "verify_over_decode": round(ver / dec, 3),
            "sign_over_to_body_and_encode": round(sign / build, 3),
            "verify_over_decode_and_from_body": round(ver / parse, 3),
            "sign_MBps": round(len(m.envelope) / (sign / 1e3) / 1e6, 1),
            "verify_MBps": round(len(m.envelope) / (ver / 1e3) / 1e6, 1),
        }
    return out


# ------------------------------------------------------------------------------------ 2. TLS
class SecureWithPlain(SecureMosquitto):
    """``SecureMosquitto`` plus one plaintext listener under the same password file and ACL.

    ``per_listener_settings false`` (set by ``secure_config``) makes ``allow_anonymous false``,
    ``password_file`` and ``acl_file`` apply to every listener, the appended one included.
    """

    def __init__(self, store: Store) -> None:
        super().__init__(store, mode="static")
        self.plain_port = free_port(self.host)

    def start(self) -> SecureWithPlain:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        text = secure_config(self.store.broker_dir, self.state_dir, self.host, self.mtls_port, self.password_port,
                             "static")
        text += f"listener {self.plain_port} {self.host}\nuse_username_as_clientid true\n"
        self.config_path.write_text(text)
        self._proc = subprocess.Popen([find_mosquitto(), "-c", str(self.config_path)], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, start_new_session=True)
        try:
            for port in (self.mtls_port, self.password_port, self.plain_port):
                wait_for_port(self.host, port)
        except TimeoutError:
            err = self._proc.stderr.read() if self._proc.poll() is not None and self._proc.stderr else b""
            self.stop()
            raise RuntimeError(f"mosquitto did not start: {err.decode(errors='replace')}") from None
        if self._proc.stderr:
            self._proc.stderr.close()  # never read again: a full pipe must not block the broker
            self._proc.stderr = None
        return self

    def arm_address(self, arm: str, username: str) -> BrokerAddress:
        if arm == "mtls":
            return self.address(username, mtls=True)
        pw = self.address(username, mtls=False)
        if arm == "tls_password":
            return pw
        return BrokerAddress(self.host, self.plain_port, False, None, pw.username, pw.password)


def tls_session(addr: BrokerAddress) -> dict[str, Any]:
    """The protocol and cipher a client with this address negotiates, and one handshake's time."""
    ctx = addr.ssl_context()
    assert ctx is not None
    t0 = time.perf_counter()
    with socket.create_connection((addr.host, addr.port), 5) as raw, \
            ctx.wrap_socket(raw, server_hostname=addr.host) as s:
        dt = time.perf_counter() - t0
        cipher = s.cipher()
        return {"protocol": s.version(), "cipher": cipher[0] if cipher else None,
                "handshake_ms": round(dt * 1000, 2)}


def check_acl(broker: SecureWithPlain, store_dir: Path) -> dict[str, int]:
    """Each arm's records reach the site's edge: the ACL passes them (a refused QoS 1 publish is acked too)."""
    got: dict[str, int] = dict.fromkeys(ARMS, 0)
    ready = threading.Event()
    lock = threading.Lock()

    def on_connect(client: mqtt.Client, *_: object) -> None:
        client.subscribe(topics.device_up(SITE, DEVICE.name, topics.Uplink.FEATURES), qos=1)

    def on_subscribe(*_: object) -> None:
        ready.set()

    def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        rec = FeatureRecord.from_body(decode_envelope(msg.payload).body)
        with lock:
            got[ARMS[int(rec.label or 0)]] += 1

    addr = broker.address(EDGE.username, mtls=True)
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=EDGE.username, protocol=mqtt.MQTTv311)
    sub.tls_set_context(addr.ssl_context())
    sub.on_connect, sub.on_subscribe, sub.on_message = on_connect, on_subscribe, on_message
    sub.connect(addr.host, addr.port)
    sub.loop_start()
    try:
        if not ready.wait(10):
            raise RuntimeError("ACL check: the edge subscriber did not subscribe in 10 s")
        arr = np.zeros(4, dtype=np.float32)
        for i, arm in enumerate(ARMS):
            dev = DeviceClient(SITE, DEVICE.name, broker.arm_address(arm, DEVICE.username),
                               store_path=store_dir / f"acl-{arm}.sqlite", max_inflight=INFLIGHT)
            try:
                if not dev.connect(10):
                    raise RuntimeError(f"ACL check: {arm} not connected in 10 s")
                for s in range(20):
                    dev.publish(FeatureRecord(DEVICE.name, s, {"x": arr}, label=i))  # label tags the arm
                if not dev.flush(20):
                    raise RuntimeError(f"ACL check: {arm} not flushed")
            finally:
                dev.close(5)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and min(got.values()) < 20:
            time.sleep(0.05)
    finally:
        sub.disconnect()
        sub.loop_stop()
    if min(got.values()) < 20:
        raise RuntimeError(f"ACL check: records received per arm {got}, expected 20 each")
    return got


def publish_rate(addr: BrokerAddress, recs: list[FeatureRecord], store: Path) -> tuple[float, float]:
    """(records/s until every PUBACK is in, seconds to connect) for one DeviceClient, as bench_sdk.py does."""
    n = len(recs)
    dev = DeviceClient(SITE, DEVICE.name, addr, store_path=store, max_inflight=INFLIGHT)
    try:
        t0 = time.perf_counter()
        if not dev.connect(10):
            raise RuntimeError(f"{addr.port}: not connected in 10 s")
        connect_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for r in recs:
            dev.publish(r)
        if not dev.flush(120):
            raise RuntimeError(f"{dev.pending} of {n} records not acknowledged after 120 s")
        dt = time.perf_counter() - t0
        sent, acked = dev.counters["sent.features"], dev.counters["acked"]
        if sent != n or acked < n:
            raise RuntimeError(f"{sent} records sent, {acked} acked, {n} published")
    finally:
        dev.close(5)
    return n / dt, connect_s


def bench_tls(n: int, repeats: int) -> dict[str, Any]:
    arr = np.random.default_rng(0).random(FLOATS, dtype=np.float32)
    recs = [FeatureRecord(DEVICE.name, i, {"accel": arr}) for i in range(n)]
    payload = len(encode_envelope(Kind.FEATURES, DEVICE.name, 0, recs[0].to_body()))
    with tempfile.TemporaryDirectory(prefix="megace-secbench-") as tmp:
        tmpdir = Path(tmp)
        store = Store.init(tmpdir / "pki", ["localhost"])
        store.add(DEVICE)
        store.add(EDGE)
        with SecureWithPlain(store) as broker:
            out: dict[str, Any] = {
                "broker": "broker.runners.secure config (static password file + ACL, tls_version tlsv1.2) "
                          "+ one plaintext listener with the same auth",
                "messages": n, "repeats": repeats, "payload_bytes": payload, "inflight": INFLIGHT, "qos": 1,
                "tls": {arm: tls_session(broker.arm_address(arm, DEVICE.username)) for arm in ARMS[1:]},
                "acl_check_records_received": check_acl(broker, tmpdir),
            }
            rates: dict[str, list[float]] = {a: [] for a in ARMS}
            connects: dict[str, list[float]] = {a: [] for a in ARMS}
            orders, loads = [], []
            for r in range(repeats):
                order = ARMS[r % 3:] + ARMS[:r % 3]  # rotate: no arm always runs first
                orders.append(list(order))
                loads.append(loadavg()[0])
                for arm in order:
                    rate, conn = publish_rate(broker.arm_address(arm, DEVICE.username), recs,
                                              tmpdir / f"q-{arm}-{r}.sqlite")
                    rates[arm].append(rate)
                    connects[arm].append(conn)
    per = {arm: [rates[arm][i] / rates["plain_password"][i] for i in range(repeats)] for arm in ARMS[1:]}
    out |= {
        "arm_order_per_repeat": orders, "loadavg_1min_per_repeat": loads,
        "records_per_s": {a: [round(x) for x in v] for a, v in rates.items()},
        "records_per_s_median": {a: round(statistics.median(v)) for a, v in rates.items()},
        "connect_ms_median": {a: round(statistics.median(v) * 1000, 1) for a, v in connects.items()},
        "ratio_over_plain_per_repeat": {a: [round(x, 3) for x in v] for a, v in per.items()},
        "ratio_over_plain_median": {a: round(statistics.median(v), 3) for a, v in per.items()},
    }
    return out


# ------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sign-reps", type=int, default=200)
    ap.add_argument("--out", default="bench/results/security.json")
    a = ap.parse_args()

    results: dict[str, Any] = {
        "bench": "security", "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
        "openssl": ssl.OPENSSL_VERSION, "loadavg_at_start": loadavg(),
    }
    # TLS first: building MiniLM imports torch, whose threads would sit in this process during the publish runs
    results["tls_publish"] = bench_tls(a.messages, a.repeats)
    results["loadavg_before_signing"] = loadavg()
    shapes, source = minilm_shapes()
    results["signing"] = {"tensor_source": source, "rank": RANK,
                          "shared_params": int(sum(np.prod(s) for s in shapes.values()))}
    results["signing"] |= bench_signing(messages(shapes), a.sign_reps)
    results["loadavg_at_end"] = loadavg()

    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=2) + "\n")

    s, p = results["signing"]["messages"], results["tls_publish"]
    print(f"{'message':<22}{'bytes':>9}{'sign ms':>9}{'verify':>9}{'encode':>9}{'decode':>9}{'s/enc':>8}{'v/dec':>8}")
    for name, m in s.items():
        print(f"{name:<22}{m['envelope_bytes']:>9}{m['sign_ms']:>9.3f}{m['verify_ms']:>9.3f}"
              f"{m['encode_envelope_ms']:>9.3f}{m['decode_envelope_ms']:>9.3f}"
              f"{m['sign_over_encode']:>8.2f}{m['verify_over_decode']:>8.2f}")
    print(f"\n{'arm':<16}{'records/s (median)':>20}{'ratio vs plain':>16}{'connect ms':>12}   runs")
    for arm in ARMS:
        ratio = p["ratio_over_plain_median"].get(arm, 1.0)
        print(f"{arm:<16}{p['records_per_s_median'][arm]:>20,}{ratio:>16.3f}{p['connect_ms_median'][arm]:>12.1f}"
              f"   {p['records_per_s'][arm]}")
    print(f"tls: {p['tls']}\nwrote {a.out}")


if __name__ == "__main__":
    main()
