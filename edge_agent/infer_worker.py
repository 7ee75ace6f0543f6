"""Extra inference workers for one site: they split its prediction requests over an MQTT 5 shared subscription.

Why: one edge process answers every prediction of its site; when requests outgrow it, more processes (or
boxes) can answer from the same model. On a broker that accepted MQTT 5 the edge subscribes the request
topic as ``$share/<group>/megace/v1/site/<site>/device/+/up/infer`` and each worker (``megace infer``, or
``megace edge --inference-workers N``, which spawns them) joins the same group: the broker hands each request
to exactly one member, the edge included. A worker answers from the ONNX model the edge exported last
(``<state_dir>/export/``, reloaded when it changes) and learns the devices' profiles from their (retained)
registrations, which every member receives (a plain subscription), so it validates a request as the edge does
(:class:`~edge_agent.core.EdgeCore` without a trainer). Its answers name the worker as sender
(``<edge_id>-w<n>``) and the model version they were computed with.

Identities (secure set-up; ``docs/SECURITY.md``): with ``worker_identities`` (``megace provision workers``)
each worker logs in as its own ``megace-infer-<edge_id>-w<n>`` (role ``infer``: its site's request group and
registrations, its site's predictions and errors, nothing else) and signs with its own key plus the edge's
grant for it, which devices pinning their edge's key accept, for that site only. Without, on an anonymous bus,
it signs with the edge's key (if any).

Deliberate limits:

* MQTT 3.1.1 (amqtt, RabbitMQ, NATS): no shared subscriptions (RabbitMQ and NATS acknowledge ``$share/...``
  and deliver nothing), so a worker refuses to start (exit code 3, one clear log line) and the edge spawns
  none; the edge serves every request itself, as before. ``$share`` is never sent on a 3.1.1 connection.
* Chunked requests (a sample larger than one packet) stay with the edge: chunks of one transfer must meet
  in one process, so the chunk topic is a plain subscription of the edge's.
* A worker starts serving only once an export exists (``training.onnx`` ``auto`` or ``on``).
* Workers use clean sessions: a worker that dies leaves the group at once; requests handed to it and not
  answered are lost (Mosquitto 2.0.11 gives them to no other member: a hung, then killed worker lost the 20
  of 60 round-robin had given it; ``tests/edge/test_shared_inference.py``). Durable sessions were worse:
  every second message went to an offline member's durable session (10 of 20, delivered when it came back).
* The edge starts a dead worker of its own again (every ``WATCH_S``; ``inference_worker_restarts``).
* An edge that logs in as an identity without ``worker_identities`` spawns none: as the edge, a worker would
  take over the edge's session (``use_username_as_clientid``, megace's secure set-up).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import aiomqtt

from broker import topics
from broker.address import BrokerAddress
from broker.metrics import Counters
from broker.protocol import V311
from broker.session import Session, ack, payload_bytes
from broker.signing import DelegatedSigner, SignatureError, load_private_key
from edge_agent.config import EdgeConfig, EdgeConfigError, load_edge_config
from edge_agent.core import EdgeCore, Outgoing
from edge_agent.onnx_serving import OnnxPredictor, last_export
from megace_common.durable import atomic_write
from megace_model.errors import EdgeModelError
from megace_model.onnx import EXPORT_DIR, META_FILE

log = logging.getLogger(__name__)

EXIT_NO_V5 = 3
"""``megace infer``'s exit status when the broker did not accept MQTT 5 (no shared subscriptions there)."""
RETAINED_QUIET_S = 0.5
"""After subscribing to registrations, a worker waits until none arrived for this long (at most
:data:`RETAINED_WAIT_S`) before joining the group: a request from a device it has not seen would be refused."""
RETAINED_WAIT_S = 5.0


IDENTITY_PREFIX = "megace-infer-"
"""Username prefix of role ``infer`` (``megace.provision.identity``): a worker's folder and login name."""


class SharedUnavailable(RuntimeError):
    """The connection is MQTT 3.1.1: shared subscriptions do not exist there, so a worker must not serve."""


class GroupRefused(RuntimeError):
    """The broker refused the worker's ``$share`` subscription (its ACL lacks the group): exit 2, no restart."""


def refused(filters: Sequence[str], granted: object, counters: Counters, who: str) -> list[str]:
    """The filters a SUBACK refused, counted (``subscribe_refused``) and logged: a refused ``$share`` (dynsec
    checks it literally: a group its ACL does not name) would otherwise lose its requests silently."""
    codes = list(granted) if isinstance(granted, (list, tuple)) else []
    out = [f for f, c in zip(filters, codes, strict=False)
           if (c.is_failure if hasattr(c, "is_failure") else isinstance(c, int) and c >= 0x80)]
    if out:
        counters.inc("subscribe_refused", len(out))
        log.error("%s: the broker refused the subscription(s) %s (not authorized?)", who, ", ".join(out))
    return out


def group_name(config: EdgeConfig) -> str:
    """The shared-subscription group of a site's request topic: ``megace-infer-<site>`` unless configured."""
    return config.infer_group or f"megace-infer-{config.site}"


def worker_login(config: EdgeConfig, worker_id: str) -> tuple[BrokerAddress, DelegatedSigner | None]:
    """How worker ``worker_id`` logs in and signs: as the edge (no ``worker_identities``), or as its own
    identity from ``<worker_identities>/megace-infer-<worker_id>/``; missing or unusable files: EdgeConfigError."""
    edge = config.address
    if not config.worker_identities:
        return edge, None
    folder = Path(config.worker_identities) / f"{IDENTITY_PREFIX}{worker_id}"
    try:
        address = edge.logged_in_as(folder)  # the edge's listener decides: mutual TLS, or TLS + password
        signer = DelegatedSigner(load_private_key(folder / "signing.ed25519"), (folder / "grant.msgpack").read_bytes())
    except (OSError, ValueError, SignatureError) as exc:
        raise EdgeConfigError(f"worker identity {folder}: {exc}") from None
    return address, signer


def request_filter(site: str) -> str:
    """Every device's inference request of ``site`` (whole messages, not chunks)."""
    return topics.site_device_uplinks(site).rsplit("/", 1)[0] + "/" + topics.Uplink.INFER.value


def shared(group: str, topic_filter: str) -> str:
    """MQTT 5's shared subscription form of ``topic_filter``."""
    return f"$share/{topics.check_id(group, 'group')}/{topic_filter}"


def sharing(filters: Sequence[str], site: str, group: str) -> tuple[list[str], list[str]]:
    """The edge's subscriptions on MQTT 5, and the plain ones they replace (to unsubscribe).

    Whole inference requests go to the group; every other uplink, and request chunks (which must meet in one
    process), stay plain. The 3.1.1 wildcard ``.../up/+`` is split per uplink kind: it would also match
    requests and hand each one to the edge a second time, beside the group's copy."""
    base = topics.site_device_uplinks(site).rsplit("/", 1)[0]
    request, request_chunks = topics.subscriptions(request_filter(site))
    wildcard, wildcard_chunks = topics.subscriptions(topics.site_device_uplinks(site))
    others = [u.value for u in topics.Uplink if u is not topics.Uplink.INFER]
    out: list[str] = []
    stale: list[str] = []
    for f in filters:
        if f == wildcard:
            out += [*(f"{base}/{u}" for u in others), shared(group, request)]
        elif f == wildcard_chunks:
            out += [*(f"{base}/{u}/chunk/+" for u in others), request_chunks]
        elif f == request:
            out.append(shared(group, request))
        else:
            out.append(f)
            continue
        stale.append(f)
    return list(dict.fromkeys(out)), stale


class InferWorker:
    """One worker: ``await InferWorker(config, "e1-w1").run(stop)``; raises :class:`SharedUnavailable` on 3.1.1."""

    def __init__(self, config: EdgeConfig, worker_id: str) -> None:
        self.config = config
        self.worker_id = topics.check_id(worker_id, "worker id")
        self.group = group_name(config)
        self.counters = Counters()
        self.address, signer = worker_login(config, self.worker_id)
        own = {} if signer is None else {"signing": dataclasses.replace(config.signing, key_file="")}
        self.core = EdgeCore(dataclasses.replace(config, edge_id=worker_id, **own), self.counters)
        """Validation and answers exactly as the edge's (no trainer: requests and registrations only)."""
        if signer is not None:
            self.core.signer = signer  # its own key and the edge's grant, never the edge's key
        self.export_dir = config.state_path / EXPORT_DIR
        self.predictor: OnnxPredictor | None = None
        self.serving = asyncio.Event()
        """Set once the worker is in the group (tests, launchers)."""
        self.session: Session | None = None
        self._stamp: int | None = None
        self._seq_file = config.state_path / f"infer-{self.worker_id}.seq"
        self.core.resume_downlink_seqs(self._reserved(), self._reserve)

    def _reserved(self) -> int:
        """The last downlink seq bound this worker persisted (0: none): its answers' seqs continue above it."""
        try:
            return int(self._seq_file.read_text())
        except (OSError, ValueError):
            return 0

    def _reserve(self, bound: int) -> None:
        """Persist a new seq bound before any seq under it is used: seqs keep increasing across restarts."""
        self._seq_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self._seq_file, str(bound).encode())

    def reload(self) -> bool:
        """Load the edge's export if it changed since the last look; True when a model is there to serve."""
        try:
            stamp = (self.export_dir / META_FILE).stat().st_mtime_ns
        except OSError:
            return self.predictor is not None
        if stamp != self._stamp:
            artifact = last_export(self.export_dir, self.config.model)
            if artifact is not None:
                self.predictor = OnnxPredictor(artifact, self.config.model, self.config.training.onnx_threads)
                self.counters.inc("model_loads")
                log.info("infer worker %s: serving model v%d (global v%d)", self.worker_id, artifact.version,
                         artifact.global_version)
            self._stamp = stamp
        return self.predictor is not None

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Serve until ``stop`` is set; refuses at once when the configured protocol is 3.1.1."""
        stop = stop or asyncio.Event()
        address = self.address
        if address.protocol == V311:
            raise SharedUnavailable("the broker protocol is set to 3.1.1; inference workers need MQTT 5 "
                                    "(protocol=auto or 5)")
        identifier = address.username or f"megace-infer-{self.config.site}-{self.worker_id}"
        self.session = Session(address, lambda client, _attempt: self._serve(client, stop),
                               identifier=identifier, counters=self.counters,
                               clean_session=True, name=f"infer worker {self.worker_id}", manual_ack=True)
        await self.session.run(stop)

    async def _serve(self, client: aiomqtt.Client, stop: asyncio.Event) -> None:
        assert self.session is not None
        if not self.session.negotiator.v5:
            raise SharedUnavailable(f"the broker at {self.config.address} speaks MQTT 3.1.1 only: no shared "
                                    "subscriptions; the edge serves every prediction itself")
        while not self.reload():
            log.info("infer worker %s: waiting for the edge's first ONNX export in %s", self.worker_id,
                     self.export_dir)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await stop.wait()
            if stop.is_set():
                return
        register = f"{request_filter(self.config.site).rsplit('/', 1)[0]}/{topics.Uplink.REGISTER.value}"
        await client.subscribe([(f, 1) for f in topics.subscriptions(register)])
        messages = aiomqtt_messages(client)
        await self._settle_registrations(client, messages)
        group = shared(self.group, request_filter(self.config.site))
        if refused([group], await client.subscribe(group, qos=1), self.counters, f"infer worker {self.worker_id}"):
            raise GroupRefused(f"the broker refused {group}: grant role infer this group (megace provision)")
        self.serving.set()
        log.info("infer worker %s joined group %s", self.worker_id, self.group)
        stopper = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                nxt = asyncio.create_task(anext(messages))
                done, _ = await asyncio.wait([nxt, stopper], return_when=asyncio.FIRST_COMPLETED)
                if nxt not in done:
                    nxt.cancel()
                    return
                await self._handle(client, nxt.result())
        finally:
            stopper.cancel()
            self.serving.clear()

    async def _settle_registrations(self, client: aiomqtt.Client, messages: AsyncIterator[aiomqtt.Message]) -> None:
        """Take the retained registrations first (until quiet), so no request meets an unknown device."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RETAINED_WAIT_S
        while loop.time() < deadline:
            try:
                async with asyncio.timeout(RETAINED_QUIET_S):
                    message = await anext(messages)
            except TimeoutError:
                return
            await self._handle(client, message)

    async def _handle(self, client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        """A registration is learnt (the edge answers it); a request is validated, predicted and answered."""
        topic = message.topic.value
        fx = self.core.ingest(topic, payload_bytes(message.payload), retained=bool(message.retain))
        out: list[Outgoing] = []
        if topic.endswith("/" + topics.Uplink.INFER.value):
            self.counters.inc("infer_requests")
            out.extend(fx.out)  # a refused request is answered with its error, as the edge would
            if fx.infers:
                self.reload()
                predictor = self.predictor
                assert predictor is not None
                try:
                    results = predictor.predict([r.sample for r in fx.infers])
                except EdgeModelError as exc:
                    for r in fx.infers:  # kept, as the edge keeps its answers: a repeat gets the same (answers.py)
                        out.extend(self.core.answers.record(r.device, r.seq, self.core.reject(exc, r.device, r.seq)))
                else:
                    out.extend(self.core.prediction(r, label, probs, predictor.version)
                               for r, (label, probs) in zip(fx.infers, results, strict=True))
        for o in out:
            await client.publish(o.topic, o.payload, qos=o.qos, retain=o.retain)
        self.counters.inc("answers", len(out))
        ack(client, message)  # only once answered: a request in flight is never acknowledged unanswered


def aiomqtt_messages(client: aiomqtt.Client) -> AsyncIterator[aiomqtt.Message]:
    """One iterator over the client's messages (aiomqtt makes a new generator per ``client.messages``)."""
    return client.messages.__aiter__()


def serve(config_path: str | None, worker_id: str) -> int:
    """Run one worker until SIGTERM/SIGINT: 0 clean, 2 bad config, 3 no MQTT 5 at the broker, 1 crash."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        config = load_edge_config(config_path)
        worker = InferWorker(config, worker_id)
    except (EdgeConfigError, ValueError) as exc:
        print(f"megace infer: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await worker.run(stop)

    try:
        asyncio.run(main())
    except SharedUnavailable as exc:
        log.error("infer worker %s not serving: %s", worker_id, exc)
        return EXIT_NO_V5
    except GroupRefused as exc:
        log.error("infer worker %s not serving: %s", worker_id, exc)
        return 2
    except Exception:
        log.exception("infer worker %s crashed", worker_id)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge_agent.infer_worker",
                                     description="Answer a site's prediction requests beside its edge (MQTT 5).")
    parser.add_argument("--config", "-c", default=os.environ.get("MEGACE_EDGE_CONFIG"), help="the edge's TOML file")
    parser.add_argument("--worker-id", required=True, help="this worker's id ([A-Za-z0-9_-], unique in the site)")
    args = parser.parse_args(argv)
    return serve(args.config, args.worker_id)


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["EXIT_NO_V5", "IDENTITY_PREFIX", "GroupRefused", "InferWorker", "SharedUnavailable",
           "group_name", "refused", "request_filter", "serve", "shared", "sharing", "worker_login"]
