"""The edge's message handling, network-free: ``EdgeCore.ingest(topic, payload)`` returns :class:`Effects`.

No sockets, no asyncio, no threads: the core decodes and validates what arrives, updates the registry, the replay buffer
and the counters, and says what should follow — the downlinks to publish (:class:`Outgoing`), the adapters to install
(:class:`ApplyJob`, run by the service on its training thread through :meth:`EdgeCore.apply`), the inference requests to
serve (:class:`InferRequest`) and whether a training round is due. The service (:mod:`edge_agent.service`) owns the
connection, the queues and the executors.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from broker import topics
from broker.errors import UnknownKindError, WireError
from broker.inbox import Inbox
from broker.metrics import Counters
from broker.signing import Signer, unsigned
from broker.wire import (
    CapabilityProfile,
    DeviceFeedback,
    Envelope,
    ErrorReport,
    FeatureRecord,
    GlobalAdapter,
    Kind,
    Prediction,
    SiteFeedback,
)
from broker.wire.bodies import FeedbackView
from broker.wire.envelope import check_content_type
from broker.wire.requests import RegisterRequest
from edge_agent.answers import AnswerBook
from edge_agent.batches import on_features_batch
from edge_agent.config import EdgeConfig
from edge_agent.errors import BusyError, IngestError, SenderMismatchError, UnregisteredDeviceError, error_code
from edge_agent.model_push import push_to_device
from edge_agent.outgoing import DownlinkWriter, Outgoing
from edge_agent.registry import DeviceRegistry
from edge_agent.state import AgentState
from edge_agent.training.trainer import Trainer
from edge_agent.views import ApplyJob, GlobalViews
from megace_common.lora import strip_peft_prefix
from megace_common.ratelimit import TokenBuckets
from megace_model.adapters import is_personal
from megace_model.errors import AdapterMismatchError, BaseMismatchError, EdgeModelError, NonFiniteAdapterError

log = logging.getLogger(__name__)

_FROM_CLOUD = frozenset({topics.Channel.GLOBAL_DOWN, topics.Channel.SITE_FEEDBACK})

UPLINK_KINDS = {"register": Kind.REGISTER, "features": Kind.FEATURES, "infer": Kind.INFER}


@dataclass(slots=True)
class InferRequest:
    device: str
    sample_id: int
    sample: dict[str, Any]
    received: float
    seq: int = 0
    done: Callable[[], None] | None = None
    """Passed on to the answer's :class:`Outgoing` (the service sets it)."""


@dataclass(slots=True)
class Effects:
    """What one message asks for: downlinks to send and work to schedule."""

    out: list[Outgoing] = field(default_factory=list)
    applies: list[ApplyJob] = field(default_factory=list)
    infers: list[InferRequest] = field(default_factory=list)
    train_due: bool = False
    durable: bool = False
    """The message changed state that a checkpoint holds (a buffered sample, a registration): the service
    logs it before acknowledging it to the broker (:mod:`edge_agent.acks`)."""
    verdicts: list[tuple[int, str | None]] = field(default_factory=list)
    """The cloud's verdicts on this edge's uploads: ``(seq, None)`` accepted, ``(seq, reason)`` refused."""
    receipt: str | None = None
    """The device whose record stream this message touched (new, filled or repeated): it is owed a receipt once
    the ingest log's commit covers it (:mod:`edge_agent.receipts`)."""


class EdgeCore:
    """Registry, replay-buffer intake, version decisions and downlink building for one edge."""

    def __init__(self, config: EdgeConfig, counters: Counters | None = None, trainer: Trainer | None = None) -> None:
        self.config = config
        self.site = config.site
        self.edge_id = config.edge_id
        self.counters = counters if counters is not None else Counters()
        self.state = AgentState()
        lim = config.limits
        self.registry = DeviceRegistry(
            config.model, max_devices=lim.max_devices, idle_evict_s=lim.device_idle_evict_s,
            max_modality_elements=lim.max_modality_elements, max_sequence_factor=lim.max_sequence_factor,
        )
        self.trainer = trainer
        self.views = GlobalViews(config.model.lora_r, config.model.lora_alpha, self.counters)
        """Which global or site view to install (cut here when the cloud names a cut); see :mod:`edge_agent.views`."""
        self.new_samples = 0
        """Labelled samples buffered since the last round (the service resets it when a round starts)."""
        self.modalities_seen: dict[str, int] = {}
        self.model_update: Any = None
        """The inference model devices that ask for one get (a ``ModelUpdate``); set by
        :func:`edge_agent.model_push.push_model`, sent to each such device when it registers."""
        self.answers = AnswerBook(self.counters)  # a repeated inference request gets the same answer again
        self.writer = DownlinkWriter(self.site, self.edge_id, config.signing.signer(), config.limits.max_packet)
        """Builds and signs device downlinks under this edge's increasing seq (:mod:`edge_agent.outgoing`)."""
        self._verifier = config.signing.verifier()
        self._inbox = Inbox(
            max_payload=config.limits.max_payload,
            channels=frozenset({topics.Channel.DEVICE_UP, topics.Channel.GLOBAL_DOWN, topics.Channel.SITE_FEEDBACK}),
            opener=self._open,
        )
        self._last_log: dict[str, float] = {}
        self._error_downlinks = TokenBuckets(lim.error_downlinks_per_s, lim.error_downlink_burst,
                                             max_keys=lim.max_devices)

    # ================================================================== intake
    def ingest(self, topic: str, payload: bytes, *, retained: bool = False) -> Effects:
        """Process one MQTT message; never raises (a bad message is counted and, for a device, answered)."""
        fx = Effects()
        parsed = None
        env = None
        try:
            got = self._inbox.accept(topic, payload)
            if got is None:
                return fx  # a chunk of an unfinished transfer
            parsed, env = got
            channel = parsed.channel
            if channel is topics.Channel.DEVICE_UP:
                expected = UPLINK_KINDS[parsed.what or ""]
                device = parsed.device or ""
                if env.kind is Kind.FEATURES_BATCH and expected is Kind.FEATURES:  # a batch rides the features topic
                    self._check_uplink(device, env)
                    on_features_batch(self, fx, device, env)
                elif env.kind is not expected:
                    raise UnknownKindError(f"{parsed.what} topic carries a {env.kind.value!r} envelope")
                elif expected is Kind.FEATURES:
                    self._on_features(fx, device, env)
                elif expected is Kind.INFER:
                    self._on_infer(fx, device, env)
                else:
                    self._on_register(fx, device, env, retained=retained)
            elif channel is topics.Channel.GLOBAL_DOWN:
                if env.kind is not Kind.GLOBAL:
                    raise UnknownKindError(f"global topic carries a {env.kind.value!r} envelope")
                self._on_global(fx, GlobalAdapter.from_body(env.body))
            elif channel is topics.Channel.SITE_FEEDBACK:
                if env.kind is not Kind.SITE_FEEDBACK:
                    raise UnknownKindError(f"feedback topic carries a {env.kind.value!r} envelope")
                self._on_site_feedback(fx, SiteFeedback.from_body(env.body), FeedbackView.of(env.body))
            else:
                self.counters.inc("ignored")
        except (WireError, IngestError, EdgeModelError) as exc:
            fx.out.extend(self.reject(exc, self._device_of(topic, parsed), env.seq if env is not None else None))
        except Exception as exc:  # a bug must cost one message, not the service
            self.counters.inc("internal_errors")
            log.exception("edge %s: internal error on %s", self.edge_id, topic)
            fx.out.extend(self.reject(exc, self._device_of(topic, parsed), env.seq if env is not None else None))
        return fx

    def _open(self, parsed: topics.Parsed, payload: bytes) -> bytes:
        """What comes from the cloud must carry a valid signature by a pinned cloud key (when one is set);
        a forged, unsigned or altered global is refused before it is even decoded."""
        if self._verifier is not None and parsed.channel in _FROM_CLOUD:
            return self._verifier.open(payload)
        return unsigned(payload)

    @staticmethod
    def _device_of(topic: str, parsed: topics.Parsed | None) -> str | None:
        if parsed is None:
            try:
                parsed = topics.parse(topic)
            except ValueError:  # WireError, and whatever topics.parse lets slip (e.g. ".../chunk/²")
                return None
        return parsed.device if parsed.channel is topics.Channel.DEVICE_UP else None

    def reject(self, exc: BaseException, device: str | None, ref: int | None) -> list[Outgoing]:
        """Count by class, log (rate-limited); the error downlink for the device, when there is one to tell."""
        self.counters.reject(exc)
        name = type(exc).__name__
        now = time.monotonic()
        if now - self._last_log.get(name, 0.0) > 5.0:
            self._last_log[name] = now
            log.warning("edge %s rejected input%s: %s: %s", self.edge_id, f" from {device}" if device else "",
                        name, exc)
        if device is None:
            return []
        entry = self.registry.devices.get(device)
        if entry is not None:
            entry.count("rejected")
        # a shed inference request is still answered: the device waits for exactly one reply per request
        if not isinstance(exc, BusyError) and not self._error_downlinks.allow(device):
            self.counters.inc("errors_suppressed")
            return []
        code = error_code(exc).value
        return [self.down(device, Kind.ERROR, ErrorReport(code=code, message=f"{name}: {exc}"[:500], ref=ref))]

    # ------------------------------------------------------------- device uplinks
    @staticmethod
    def _check_uplink(device: str, env: Envelope) -> None:
        """The envelope speaks for the device its topic names, with the content type its kind names (SPEC §3).

        The topic is what a broker's ACL ties to the device's credentials; ``s`` is self-declared, so a
        mismatch is refused before anything (guards, registry, buffer) is touched.
        """
        if env.sender != device:
            raise SenderMismatchError(f"envelope sender {env.sender!r} is not {device!r}, the device of its topic")
        check_content_type(env)

    def _on_register(self, fx: Effects, device: str, env: Envelope, *, retained: bool) -> None:
        self._check_uplink(device, env)
        seq = env.seq
        profile = CapabilityProfile.from_body(env.body)
        known = self.registry.devices.get(device)
        if profile.epoch and known is not None and known.profile.epoch:
            # the device says which sequence store it numbers from: only a new one restarts its seqs
            restarted = profile.epoch != known.profile.epoch
        else:
            # no epoch (older firmware): a live registration at or below a seq already seen means the device
            # lost its store; a redelivered old registration looks the same, hence the epoch
            restarted = not retained and any(g.last.get(device, -1) >= seq for g in self.registry.guards.values())
        evicted = self.registry.evicted
        entry = self.registry.register(device, profile, fresh=restarted)
        if restarted:
            self.answers.forget(device)  # its seqs start over: a kept answer must not answer a new request
        self.registry.features.foreign(device, seq)  # the registration's seq is no missing record
        if profile.resend_from is not None:  # nothing below it will come again: no gap there (receipts)
            self.registry.features.floor(device, profile.resend_from)
        if self.registry.evicted > evicted:
            self.counters.inc("devices_evicted", self.registry.evicted - evicted)
        self.counters.inc("registrations")
        fx.durable = True
        config = entry.config(model_version=max(self.state.global_version, 0))
        config.receipts = self.config.receipts  # the device keeps records until receipted (edge_agent/receipts.py)
        fx.out.append(self.down(device, Kind.CONFIG, config))
        if entry.local_model and self.model_update is not None:
            fx.out.extend(push_to_device(self, device))

    def _on_features(self, fx: Effects, device: str, env: Envelope) -> None:
        self._check_uplink(device, env)
        seq, body = env.seq, env.body
        registry = self.registry
        entry = registry.devices.get(device)
        if entry is None:
            raise UnregisteredDeviceError(f"device {device!r} is not registered; publish a registration first")
        fx.receipt = device
        if registry.is_duplicate("features", device, seq):
            self.counters.inc("duplicates")
            return
        record = FeatureRecord.from_body(body, max_array_bytes=self.config.limits.max_array_bytes)
        sample = registry.check(device, record, need_label=True)
        registry.is_new("features", device, seq)  # only now: a rejected record must not advance the guard
        entry.count("records")
        fx.durable = True  # unlabeled too: a replay rebuilds the guard (and so the receipts) from the log
        label = sample["label"]
        if label is None:
            self.counters.inc("unlabeled")
            return
        assert self.trainer is not None
        # registry.check already enforced what Trainer.add_sample would re-check (known modality,
        # token width, finite values, label range): buffer directly, this is the ingest hot path
        modalities = sample["modalities"]
        self.trainer.buffer.add(device, modalities, int(label))
        self.counters.inc("samples_total")
        seen = self.modalities_seen
        for name in modalities:
            seen[name] = seen.get(name, 0) + 1
        self.new_samples += 1
        fx.durable = True
        if self.new_samples >= self.config.training.min_new_samples:
            fx.train_due = True

    def _on_infer(self, fx: Effects, device: str, env: Envelope) -> None:
        self._check_uplink(device, env)
        seq, body = env.seq, env.body
        if device not in self.registry:
            raise UnregisteredDeviceError(f"device {device!r} is not registered; publish a registration first")
        if self.answers.repeated(device, seq, fx.out):  # its kept answer goes again (nothing while it is pending)
            return
        record = FeatureRecord.from_body(body, max_array_bytes=self.config.limits.max_array_bytes)
        sample = self.registry.check(device, record, need_label=False)
        self.answers.accepted(device, seq, new=self.registry.is_new("infer", device, seq))  # gap-aware guard
        self.registry.features.foreign(device, seq)  # a request's seq is no missing record
        fx.infers.append(InferRequest(device, record.sample, sample, time.perf_counter(), seq))

    # ------------------------------------------------------------ cloud downlinks
    def _on_global(self, fx: Effects, msg: GlobalAdapter) -> None:
        if self.config.training.local_only:
            self.counters.inc("global_ignored")
            return
        assert self.trainer is not None
        if msg.base_model != self.trainer.fingerprint:
            raise BaseMismatchError(f"global v{msg.version} was made for base {msg.base_model[:12]}..., "
                                    f"this edge runs {self.trainer.fingerprint[:12]}...")
        fx.applies.extend(self.views.on_global(msg, self.state.global_version))

    def _on_site_feedback(self, fx: Effects, msg: SiteFeedback, view: FeedbackView) -> None:
        if msg.site != self.site:
            self.counters.inc("ignored")
            return
        if self.config.training.local_only:
            self.counters.inc("global_ignored")
            return
        accepted = set(msg.accepted)
        fx.verdicts.extend((seq, None) for seq in msg.accepted)
        fx.verdicts.extend((r.seq, r.reason) for r in msg.rejected if r.seq not in accepted)
        stats = {k: float(v) for k, v in msg.stats.items()}
        jobs = self.views.on_feedback(msg, view, stats, self.state.global_version, self.state.global_source)
        if jobs is None:
            fx.out.extend(self.relay_feedback(msg.version, stats, "feedback"))
        else:
            fx.applies.extend(jobs)

    def apply(
        self, source: str, version: int, tensors: dict[str, np.ndarray]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
        """Install a global (or the site's view of it) into the trainer; None if superseded meanwhile.

        Runs where the trainer is written (the service's training thread). The view of the same version
        is preferred over the global (it is cut to this edge's rank). Validation happens before anything
        is written, so a bad adapter leaves the model untouched.
        """
        trainer = self.trainer
        assert trainer is not None
        current, current_source = self.state.global_version, self.state.global_source
        if version < current or (version == current and not (source == "view" and current_source == "global")):
            return None
        shared = {k: v for k, v in tensors.items() if not is_personal(k)}
        personal = {strip_peft_prefix(k): v for k, v in tensors.items() if is_personal(k)}
        if personal and self.config.training.share_personal:
            _check_like(trainer.personal_state(), personal)
        else:
            personal = {}
        fleet_personal = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in personal.items()}
        # a view may omit modules (see Trainer); the personal part is installed, or deferred, with the adapter
        trainer.apply_global(shared, strict=source != "view", personal=fleet_personal or None)
        self.state.global_version, self.state.global_source = version, source
        return trainer.shared_state(), trainer.personal_state()

    # ================================================================ outbound
    def relay_feedback(self, version: int, stats: dict[str, float], message: str) -> list[Outgoing]:
        """The round's outcome, told to every registered device."""
        feedback = DeviceFeedback(global_version=version, metrics=stats, message=message)
        out = [self.down(device, Kind.FEEDBACK, feedback) for device in list(self.registry.devices)]
        self.counters.inc("feedback_relayed")
        return out

    def prediction(self, request: InferRequest, label: int, probs: Any, version: int) -> Outgoing:
        self.counters.inc("predictions")
        answer = Prediction(request.device, request.sample_id, label, probs, version)
        return self.answers.record(request.device, request.seq, [self.down(request.device, Kind.PREDICTION, answer)])[0]

    def resume_downlink_seqs(self, reserved: int, reserve: Callable[[int], None]) -> None:
        """Downlink seqs continue after ``reserved``; see :meth:`DownlinkWriter.resume`."""
        self.writer.resume(reserved, reserve)

    def down(self, device: str, kind: Kind, message: Any) -> Outgoing:
        """A device downlink envelope (this edge's own, increasing envelope seq)."""
        return self.writer.device(device, kind, message)

    def register_request(self) -> Outgoing:
        """Ask every device of the site to publish its registration again (sent after each subscribe): the
        retained registrations may never reach this edge's wildcard filter (RabbitMQ); a live one does."""
        self.counters.inc("register_requests")
        return self.writer.signed(topics.register_request(self.site), Kind.REGISTER_REQUEST,
                                  RegisterRequest(self.site, self.edge_id))

    def down_frames(self, device: str, kind: Kind, message: Any, max_packet: int | None = None) -> list[Outgoing]:
        """A device downlink that may not fit one packet (a model), chunked; see :meth:`DownlinkWriter.frames`."""
        return self.writer.frames(device, kind, message, max_packet)

    @property
    def signer(self) -> Signer | None:
        """Signs uploads and device downlinks (None: unsigned); see :mod:`broker.signing`."""
        return self.writer.signer

    @signer.setter
    def signer(self, signer: Signer | None) -> None:
        self.writer.signer = signer


def _check_like(reference: Mapping[str, torch.Tensor], given: Mapping[str, Any]) -> None:
    """Personal tensors from the cloud (share_personal baseline) must match names, shapes and be finite."""
    if set(given) != set(reference):
        raise AdapterMismatchError(f"personal tensors differ: {sorted(set(given) ^ set(reference))[:5]}")
    for name, value in given.items():
        array = np.asarray(value)
        if tuple(array.shape) != tuple(reference[name].shape):
            raise AdapterMismatchError(f"{name}: shape {array.shape} != {tuple(reference[name].shape)}")
        if not np.isfinite(array).all():
            raise NonFiniteAdapterError(f"{name}: contains NaN or infinite values")


__all__ = ["ApplyJob", "EdgeCore", "Effects", "InferRequest", "Outgoing"]
