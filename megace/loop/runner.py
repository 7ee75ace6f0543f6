"""The closed loop: broker, cloud and edges as processes, simulated devices, rounds, measurements.

A round is driven by data, as in the field: every device sends its next portion of labelled samples;
each edge starts a local round once its portion is in (``min_new_samples`` is set to exactly that),
uploads its shared adapter; the cloud aggregates when all edges have reported (``buffer_k`` = edges)
and publishes the next global version; once every edge has applied it, every device asks for
predictions on its own test samples. Accuracy and latency are what the devices observed.

By default the bus is the anonymous loopback demo. ``LoopSettings.secure`` (``megace run --secure``)
provisions an identity per service, device and the monitor, runs a private Mosquitto with TLS and
per-identity ACLs, and turns signatures on and required (:mod:`megace.loop.secure`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from broker import topics
from broker.address import BrokerAddress
from megace.datasets import EdgeData, MultimodalDataset, default_modality_sets, label_skew, load_dataset, partition
from megace.loop import configs, retained
from megace.loop.children import Children
from megace.loop.devices import InferenceResult, SimulatedDevice
from megace.loop.monitor import BusView, Monitor
from megace.loop.results import EdgeRound, LatencySample, LoopResult, RoundRecord, percentile
from megace.loop.secure import (
    MONITOR,
    SecureBus,
    cloud_identity,
    device_identity,
    edge_identity,
    loop_identities,
    signature_rejections,
)
from megace.loop.settings import LoopSettings

log = logging.getLogger(__name__)

Progress = Callable[[str, Any], None]
"""Called with ("status", str), ("round", RoundRecord), ("done", LoopResult)."""


class LoopError(RuntimeError):
    """The loop could not run (a service died or never came up); the message says which and why."""


def default_out_dir(root: Path = Path("runs")) -> Path:
    return root / datetime.now().strftime("%Y%m%d-%H%M%S")


def _broker_url(a: BrokerAddress) -> str:
    """The services' URL for ``a``: its password inline, its protocol (``3.1.1`` for the embedded broker),
    session expiry, timeouts and other nodes carried; the CA goes through ``SSL_CERT_FILE`` instead."""
    return replace(a, ca_file=None, cert_file=None, key_file=None, password_file=None).url(with_password=True,
                                                                                           pin_protocol=True)


class ClosedLoop:
    """One run of the loop; :meth:`run` always stops what it started, whatever happens."""

    def __init__(self, settings: LoopSettings, progress: Progress | None = None) -> None:
        self.s = settings.resolved()
        self.out = Path(self.s.out) if self.s.out else default_out_dir()
        self.progress = progress or (lambda kind, payload: None)
        self._stack = contextlib.ExitStack()
        self.children: Children | None = None
        self.devices: list[SimulatedDevice] = []
        self.evaluators: list[SimulatedDevice] = []
        self.monitor: Monitor | None = None
        self.secure: SecureBus | None = None
        """``--secure``: the provisioning folder and the private Mosquitto (None: the anonymous demo bus)."""
        self.address: BrokerAddress | None = None
        """The monitor's address; in the plain demo everyone's."""
        if self.s.secure and (self.s.broker_url or self.s.username or self.s.password or self.s.ca_file):
            raise ValueError("secure runs start their own broker and issue every credential: "
                             "no broker URL, user name, password or CA file")

    # ------------------------------------------------------------------ set-up
    def _data(self) -> tuple[MultimodalDataset, MultimodalDataset, list[EdgeData]]:
        s = self.s
        train, test = load_dataset(s.dataset, seed=s.seed, max_samples=s.max_samples, **(s.dataset_options or {}))
        sets = s.modality_sets or default_modality_sets(list(train.modalities), s.edges)
        edges = partition(train, s.edges, s.alpha, sets, s.seed, test=test, devices_per_edge=s.devices_per_edge)
        return train, test, edges

    def _broker(self, parts: list[EdgeData]) -> BrokerAddress:
        s = self.s
        if s.secure:
            return self._secure_broker(parts)
        if s.broker_url:
            a = BrokerAddress.from_url(s.broker_url)
            return replace(a, ca_file=s.ca_file or a.ca_file, username=s.username or a.username,
                           password=s.password or a.password)
        if s.broker_kind == "mosquitto":
            from broker.runners import MosquittoBroker

            b = self._stack.enter_context(MosquittoBroker(persistence=False))
        else:
            from broker.runners import EmbeddedBroker

            b = self._stack.enter_context(EmbeddedBroker(ws_port=s.ws_port))
        return b.address  # the runner's own: the embedded broker's says MQTT 3.1.1 (no probe for 5)

    def _secure_broker(self, parts: list[EdgeData]) -> BrokerAddress:
        """Provision the CA and every identity (cloud, edges, devices, evaluators, monitor; the dashboard with a
        ``ws_port``), then start the private Mosquitto with their password and ACL files (a ``wss://`` listener
        with a ``ws_port``, announced as a ``"dashboard"`` progress event); returns the monitor's address."""
        self.progress("status", "provisioning a CA, identities and signing keys…")
        bus = SecureBus(Path(self.s.state_dir) if self.s.state_dir else None)
        self.secure = bus
        self._stack.callback(bus.close)
        bus.provision(loop_identities(parts, dashboard=self.s.ws_port is not None))
        self.progress("status", "starting the secure broker (mutual TLS + TLS/password listeners, ACLs)…")
        bus.start(ws_port=self.s.ws_port)
        login = bus.dashboard_login()
        if login is not None:
            self.progress("dashboard", login)
        return bus.address(MONITOR)

    def _device_address(self, site: str, name: str) -> BrokerAddress:
        """Where a device connects: its own certificate on the secure broker, else the shared address."""
        if self.secure is not None:
            return self.secure.address(device_identity(site, name))
        assert self.address is not None
        return self.address

    def _edge_key(self, edge: int) -> Path | None:
        return self.secure.device_edge_key(edge) if self.secure is not None else None

    def _new_device(self, site: str, name: str, edge: int, train: MultimodalDataset,
                    test: MultimodalDataset) -> SimulatedDevice:
        return SimulatedDevice(site, name, edge, train, test, self._device_address(site, name), self.out / "devices",
                               edge_key=self._edge_key(edge))

    def _spawn(self, schema: MultimodalDataset, plans: list[configs.EdgePlan], address: BrokerAddress) -> None:
        s = self.s
        bus = self.secure
        url = _broker_url(address)
        children = Children(self.out / "logs")
        self.children = children
        if address.ca_file and bus is None:  # the services build their TLS context from the default verify paths
            children.env["SSL_CERT_FILE"] = address.ca_file
        self._stack.callback(children.stop)
        cfg_dir = self.out / "config"
        if not s.local_only:
            # secure: each service its own certificate (the URL names the files, never a secret) and keys
            cloud_url = bus.address(cloud_identity()).url() if bus else url
            doc = configs.cloud_config(s, schema, len(plans), cloud_url, self.out / "state" / configs.CLOUD_ID,
                                       signing=bus.cloud_signing(p.index for p in plans) if bus else None)
            children.spawn(configs.CLOUD_ID, "cloud", configs.write_cloud_config(doc, cfg_dir / "cloud.toml"))
        for p in plans:
            edge_url = bus.address(edge_identity(p.index)).url() if bus else url
            doc = configs.edge_config(s, schema, p, edge_url, self.out / "state" / p.ident, s.round_timeout_s,
                                      signing=bus.edge_signing(p.index) if bus else None)
            if bus:  # the receiver process logs in as the edge, the agent beside it as its control identity
                doc["control_identity"] = bus.control_folder(p.index)
            children.spawn(p.ident, "edge", configs.write_edge_config(doc, cfg_dir / f"{p.ident}.toml"))

    def _wait_services(self, plans: list[configs.EdgePlan]) -> None:
        assert self.monitor is not None and self.children is not None
        want = [(topics.Role.EDGE, p.ident) for p in plans]
        if not self.s.local_only:
            want.append((topics.Role.CLOUD, configs.CLOUD_ID))
        deadline = time.monotonic() + self.s.services_timeout_s
        while True:
            missing = [ident for role, ident in want if not self.monitor.online(role, ident)]
            if not missing:
                return
            self._check_children()
            if time.monotonic() > deadline:
                raise LoopError(f"services not online after {self.s.services_timeout_s:.0f} s: {missing}")
            self.progress("status", f"starting services… waiting for {', '.join(missing)}")
            time.sleep(0.5)

    def _check_children(self) -> None:
        assert self.children is not None
        dead = self.children.dead()
        if dead:
            c = dead[0]
            raise LoopError(f"{c.name} exited with code {c.proc.returncode}; last log lines ({c.log}):\n{c.tail()}")

    # ------------------------------------------------------------------ rounds
    def _round_done(self, plans: list[configs.EdgePlan], r: int, version0: int) -> Callable[[BusView], bool]:
        local = self.s.local_only

        def done(view: BusView) -> bool:
            for p in plans:
                m = view.edge_metrics.get(p.ident, {})
                if int(m.get("round", 0) or 0) < r:
                    return False
                if not local and int(m.get("global_version", 0) or 0) < version0 + r:
                    return False
            return True

        return done

    def _start_devices(self) -> None:
        self.progress("status", "devices registering…")
        for d in self.devices:
            d.start()
            self._stack.callback(d.close)

    def _evaluate(self, pool: ThreadPoolExecutor) -> list[InferenceResult]:
        futures = [pool.submit(d.evaluate) for d in self.devices]
        return [r for f in futures for r in f.result()]

    def _record(self, r: int, started: float, plans: list[configs.EdgePlan],
                results: list[InferenceResult]) -> RoundRecord:
        assert self.monitor is not None
        with self.monitor.lock:
            view = self.monitor.view
            edge_m = {k: dict(v) for k, v in view.edge_metrics.items()}
            cloud_m = dict(view.cloud_metrics.get(configs.CLOUD_ID, {}))
            traffic = {p.ident: (view.up_bytes(p.ident), view.cloud_to(p.site)) for p in plans}
        edges = []
        for p in plans:
            mine = [x for x in results if x.edge == p.index]
            lat = [1000 * x.latency_s for x in mine if x.latency_s is not None]
            m = edge_m.get(p.ident, {})
            edges.append(EdgeRound(
                edge=p.ident, rank=p.rank, modalities=list(p.modalities),
                device_acc=sum(x.correct for x in mine) / len(mine) if mine else math.nan,
                answered=sum(x.predicted is not None for x in mine), asked=len(mine),
                latency_ms_p50=percentile(lat, 0.5), latency_ms_p95=percentile(lat, 0.95),
                heldout_acc=_num(m.get("heldout_acc")), train_acc=_num(m.get("train_acc")),
                global_version=_int(m.get("global_version")), edge_round=_int(m.get("round")),
                bytes_up=float(traffic[p.ident][0]), bytes_down=float(traffic[p.ident][1]),
            ))
        return RoundRecord(round=r, elapsed_s=time.monotonic() - started,
                           global_version=_int(cloud_m.get("version")), edges=edges, cloud=cloud_m)

    def _latency(self, plans: list[configs.EdgePlan],
                 rounds: list[tuple[int, list[InferenceResult]]]) -> list[LatencySample]:
        assert self.monitor is not None
        with self.monitor.lock:
            taps = dict(self.monitor.view.taps)
        out = []
        for r, results in rounds:
            for x in results:
                if x.received is None:
                    continue
                t = taps.get((x.device, x.request))
                out.append(LatencySample.from_stamps(
                    plans[x.edge].ident, x.sent, x.received, t.request_seen if t else None,
                    t.answer_seen if t else None, device=x.device, request=x.request, round=r))
        return out

    def _global_eval(self, test: MultimodalDataset, plans: list[configs.EdgePlan],
                     address: BrokerAddress, pool: ThreadPoolExecutor) -> dict[str, float]:
        """Each edge answers the *whole* test set (in its modalities) through an extra evaluator device."""
        evaluators = []
        for p in plans:
            ds = test.with_modalities(p.modalities)
            d = self._new_device(p.site, f"e{p.index}-eval", p.index, ds, ds)
            d.start()
            self._stack.callback(d.close)
            self.evaluators.append(d)
            evaluators.append((p, d))
        for _, d in evaluators:
            d.wait_configured(20.0)
        futures = {p.ident: pool.submit(d.evaluate) for p, d in evaluators}
        out = {}
        for ident, f in futures.items():
            res = f.result()
            out[ident] = sum(x.correct for x in res) / len(res) if res else math.nan
        return out

    # ------------------------------------------------------------------ main
    def run(self) -> LoopResult:
        s = self.s
        self.out.mkdir(parents=True, exist_ok=True)
        wall0 = time.monotonic()
        result = LoopResult(settings=s.to_dict(), rounds=[], out_dir=str(self.out))
        try:
            self.progress("status", f"loading {s.dataset}…")
            train, test, parts = self._data()
            result.label_skew = label_skew(parts)
            result.partition = {
                configs.edge_id(e.edge_id): {"modalities": list(e.modalities), "train": len(e.train),
                                             "test": len(e.test), "classes": e.train.class_counts().tolist()}
                for e in parts
            }
            stream = s.stream_rounds or s.rounds
            self.progress("status", "starting the broker…")
            address = self.address = self._broker(parts)
            result.security = self._security_setup(address)
            for e in parts:
                for d in e.devices:
                    self.devices.append(self._new_device(
                        configs.site_id(e.edge_id), configs.device_id(e.edge_id, d.device_id), e.edge_id,
                        d.train, d.test))
            plans = [
                configs.EdgePlan(e.edge_id, s.rank_of(e.edge_id), tuple(e.modalities),
                                 sum(d.portion(stream) for d in self.devices if d.edge == e.edge_id))
                for e in parts
            ]
            if s.broker_url:  # a broker that outlives runs may still hold an earlier run's globals (and chunks)
                self.progress("status", "clearing what earlier runs left retained…")
                retained.clear_retained(address, retained.loop_topics(plans, self.devices))
            self.monitor = Monitor(address, [(d.site, d.name) for d in self.devices]).start()
            self._stack.callback(self.monitor.stop)
            if s.late_edges:  # registrations retained before any edge listens: each edge must ask for them again
                self._start_devices()
            self._spawn(train, plans, address)
            self._wait_services(plans)
            if not s.late_edges:
                self._start_devices()
            for d in self.devices:
                d.wait_configured(20.0)
            with self.monitor.lock:
                version0 = int(self.monitor.view.cloud_metrics.get(configs.CLOUD_ID, {}).get("version", 0) or 0)
            pool = self._stack.enter_context(ThreadPoolExecutor(max_workers=max(4, len(self.devices))))
            all_results: list[tuple[int, list[InferenceResult]]] = []
            started = time.monotonic()
            result.stopped_because = f"{s.rounds} rounds done"
            for r in range(1, s.rounds + 1):
                self.progress("status", f"round {r}/{s.rounds}: devices send data, edges train, cloud aggregates…")
                for d in self.devices:
                    d.publish_train(d.portion(stream))
                for d in self.devices:
                    d.flush(30.0)
                budget = min(s.round_timeout_s, s.time_limit_s - (time.monotonic() - wall0))
                if not self._wait_round(plans, r, version0, budget):
                    result.stopped_because = (f"round {r} not complete after {budget:.0f} s "
                                              f"({'time limit' if budget < s.round_timeout_s else 'round timeout'})")
                    break
                self.progress("status", f"round {r}/{s.rounds}: devices ask for predictions…")
                results = self._evaluate(pool)
                all_results.append((r, results))
                record = self._record(r, started, plans, results)
                result.rounds.append(record)
                self.progress("round", record)
            result.latency = self._latency(plans, all_results)
            with self.monitor.lock:
                result.uploads = [asdict(u) for u in self.monitor.view.uploads]
            if s.global_eval and result.rounds:
                self.progress("status", "global evaluation: every edge answers the whole test set…")
                result.global_acc = self._global_eval(test, plans, address, pool)
        except KeyboardInterrupt:
            result.stopped_because = "interrupted"
            raise
        finally:
            if self.secure is not None and self.monitor is not None:
                try:
                    result.security.update(self._security_outcome())
                except Exception:  # the report must not hide why the loop stopped
                    log.exception("could not collect the security outcome")
            self.progress("status", "stopping services…")
            self._stack.close()
            result.wall_s = time.monotonic() - wall0
        if result.rounds:
            from megace.loop.params import edge_parameter_counts

            result.params = edge_parameter_counts(s, train)
        return result

    def _wait_round(self, plans: list[configs.EdgePlan], r: int, version0: int, budget: float) -> bool:
        assert self.monitor is not None
        deadline = time.monotonic() + max(budget, 0.0)
        done = self._round_done(plans, r, version0)
        while time.monotonic() < deadline:
            if self.monitor.wait_until(done, min(1.0, max(deadline - time.monotonic(), 0.0))):
                return True
            self._check_children()
        return False

    # ------------------------------------------------------------------ security
    def _security_setup(self, address: BrokerAddress) -> dict[str, Any]:
        if self.secure is not None:
            return self.secure.describe()
        if self.s.broker_url:
            return {"secure": False, "broker": f"external broker {address}", "tls": address.tls,
                    "username": address.username, "signatures": "off"}
        return {"secure": False, "broker": f"{self.s.broker_kind} broker on {address}",
                "demo": "anonymous loopback demo: no TLS, no identities, no ACLs, no signatures "
                        "(megace run --secure for the secured set-up)"}

    def _security_outcome(self) -> dict[str, Any]:
        """What the secured run observed: signature rejections per service (0 when healthy) and how many of the
        messages the monitor read carried a signature."""
        assert self.monitor is not None
        with self.monitor.lock:
            view = self.monitor.view
            edge_m = {k: dict(v) for k, v in view.edge_metrics.items()}
            cloud_m = {k: dict(v) for k, v in view.cloud_metrics.items()}
            signed = {ch.value: view.signed_share(ch) for ch in (topics.Channel.ADAPTER_UP, topics.Channel.DEVICE_DOWN)}
        devices = {d.name: d.client.counters.snapshot() for d in [*self.devices, *self.evaluators]}
        return {"signature_rejections": signature_rejections(edge_m, cloud_m, devices),
                "signed_on_bus": {"uploads": list(signed[topics.Channel.ADAPTER_UP.value]),
                                  "predictions": list(signed[topics.Channel.DEVICE_DOWN.value])}}


def run_loop(settings: LoopSettings, progress: Progress | None = None) -> LoopResult:
    """Run one closed loop and return its measurements (the report is written by the caller)."""
    return ClosedLoop(settings, progress).run()


def _num(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _int(x: Any) -> int | None:
    try:
        return int(x)
    except (TypeError, ValueError):
        return None


__all__ = ["ClosedLoop", "LoopError", "run_loop"]
