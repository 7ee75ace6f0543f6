"""Fuzz targets for the services' network-free handlers: ``EdgeCore.ingest`` and ``AggregatorCore.ingest``.

Each harness owns one real core (a tiny real trainer behind the edge, a real ledger behind the cloud)
and feeds it short scripts of hostile messages. Templates are real messages the core would accept
(the trainer's fingerprint and tensor shapes), so mutations reach the checks behind the decoders.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st

from broker import topics
from broker.chunking import frames
from broker.wire import FeatureBatch, GlobalAdapter, Kind, SiteFeedback
from tests.fuzz.strategies import envelope_map, envelopes, mutated, pack, plain, topic_choices
from tests.fuzz.targets import DEVICE_TEMPLATES, NOWHERE, PropertyViolation, Target, tmpdir

SITE_DEVICES = ["dev-1", "dev-2", "dev-3"]


class EdgeHarness:
    """A real EdgeCore (tiny model) with one registered device; checks every ingest against the contract."""

    def __init__(self) -> None:
        import torch

        from edge_agent.checkpoints import build_trainer
        from edge_agent.core import EdgeCore
        from edge_agent.training.toy_task import ToyTask
        from megace_model.adapters import shared_state
        from tests.support.edge_testkit import edge_config, record, toy_profile

        torch.set_num_threads(1)
        config = edge_config(tmpdir("fuzz-edge-"), NOWHERE, {"site": "s1", "training": {"min_new_samples": 5},
                                                              "limits": {"max_devices": 8}})
        self.core = EdgeCore(config, trainer=build_trainer(config))
        assert self.core.trainer is not None
        sample = ToyTask(config.model, seed=1).samples(1)[0]
        wide = {**sample, "modalities": {**sample["modalities"], "env": sample["modalities"]["env"].astype("<f8")}}
        model = self.core.trainer.model
        shared = {k: np.full(tuple(v.shape), 0.01, np.float32) for k, v in shared_state(model).items()}
        glob = GlobalAdapter(1, self.core.trainer.fingerprint, "fedavg", 8, 16.0, shared)
        view = SiteFeedback("s1", 1, 8, dict(list(shared.items())[:2]), {"drift": 0.1}, [1])
        self.templates: dict[Kind, Any] = {
            **DEVICE_TEMPLATES,
            Kind.REGISTER: plain(toy_profile("dev-1").to_body()),
            Kind.FEATURES: plain(record("dev-1", 1, wide).to_body()),  # float64 env: float32 range checks
            Kind.INFER: plain(record("dev-1", 1, sample, label=False).to_body()),
            Kind.FEATURES_BATCH: plain(FeatureBatch.stack([record("dev-1", i, wide) for i in (1, 2)]).to_body()),
            Kind.GLOBAL: plain(glob.to_body()),
            Kind.SITE_FEEDBACK: plain(view.to_body()),
        }
        self.right_topic = {
            Kind.REGISTER: topics.device_up("s1", "dev-1", topics.Uplink.REGISTER),
            Kind.FEATURES: topics.device_up("s1", "dev-1", topics.Uplink.FEATURES),
            Kind.INFER: topics.device_up("s1", "dev-1", topics.Uplink.INFER),
            Kind.FEATURES_BATCH: topics.device_up("s1", "dev-1", topics.Uplink.FEATURES),
            Kind.GLOBAL: topics.global_down(),
            Kind.SITE_FEEDBACK: topics.site_feedback("s1"),
        }
        fx = self.core.ingest(self.right_topic[Kind.REGISTER], pack(envelope_map(Kind.REGISTER,
                                                                                 self.templates[Kind.REGISTER])))
        assert not fx.out[0].topic.endswith("/error"), "the harness's own registration was refused"
        self.inputs = 0

    def snapshot(self) -> tuple[Any, ...]:
        """Everything a rejected input must leave alone (not counters, not the reassembler's partials)."""
        core = self.core
        reg = core.registry
        assert core.trainer is not None
        return (
            {d: (e.accepted, repr(e.profile), e.registered_at, e.last_seen, e.last_data)
             for d, e in reg.devices.items()},
            {s: dict(g.last) for s, g in reg.guards.items()},
            len(core.trainer.buffer), core.new_samples, dict(core.modalities_seen),
            core.state.global_version, core.state.global_source, core.state.upload_seq,
        )

    def strategy(self) -> st.SearchStrategy[list[tuple[str, bytes, bool]]]:
        kinds = sorted(self.right_topic, key=lambda k: k.value)

        @st.composite
        def script(draw: st.DrawFn) -> list[tuple[str, bytes, bool]]:
            msgs = []
            for _ in range(draw(st.integers(1, 3))):
                retained = draw(st.booleans())
                if draw(st.integers(0, 2)):  # the right kind on its topic, body and envelope bent
                    kind = draw(st.sampled_from(kinds))
                    device = draw(st.sampled_from(SITE_DEVICES)) if kind in (Kind.REGISTER, Kind.FEATURES,
                                                                              Kind.INFER, Kind.FEATURES_BATCH) else None
                    topic = self.right_topic[kind]
                    topic = topic.replace("/dev-1/", f"/{device}/") if device else topic
                    body = draw(mutated(self.templates[kind])) if draw(st.integers(0, 4)) else self.templates[kind]
                    if device and isinstance(body, dict) and body.get("device") == "dev-1":
                        body = {**body, "device": device}
                    seq = draw(st.one_of(st.integers(0, 10**9), st.integers(0, 40)))
                    payload = pack(envelope_map(kind, body, sender=device or "cloud", seq=seq))
                else:
                    topic, payload = draw(topic_choices("s1", SITE_DEVICES)), draw(envelopes(self.templates))
                if draw(st.integers(0, 6)) == 0 and topic.startswith("megace/v1/") and len(payload) > 40:
                    parts = frames(topic, payload, sender="x", max_packet=256 + draw(st.integers(16, 4096)))
                    keep = draw(st.integers(1, len(parts)))
                    msgs += [(t, p, retained) for t, p in draw(st.permutations(parts))[:keep]]
                else:
                    msgs.append((topic, payload, retained))
            return msgs

        return script()

    def run(self, msgs: list[tuple[str, bytes, bool]]) -> None:
        from edge_agent.core import Effects

        core = self.core
        for topic, payload, retained in msgs:
            self.inputs += 1
            before, rejected = self.snapshot(), core.counters["rejected"]
            try:
                fx: Effects = core.ingest(topic, payload, retained=retained)
            except Exception as exc:
                raise PropertyViolation(f"EdgeCore.ingest raised {type(exc).__name__}: {exc}") from exc
            if core.counters["internal_errors"]:
                raise PropertyViolation(f"EdgeCore.ingest counted an internal error on {topic!r}")
            if core.counters["rejected"] > rejected and self.snapshot() != before:
                raise PropertyViolation(f"a rejected message on {topic!r} changed the edge's state")
            for job in fx.applies:  # what the service then runs on its training thread
                try:
                    core.apply(job.source, job.version, job.tensors)
                except ValueError:  # typed refusals (AdapterMismatchError, NonFiniteAdapterError, ...)
                    pass
                except Exception as exc:
                    raise PropertyViolation(f"EdgeCore.apply raised {type(exc).__name__}: {exc}") from exc


class CloudHarness:
    """A real AggregatorCore (tiny model, real ledger); its ``ingest`` must never raise."""

    def __init__(self) -> None:
        from cloud_aggregator.core import AggregatorCore
        from megace_model.adapters import build_edge_model, shared_state
        from megace_model.fingerprint import base_fingerprint
        from tests.support.cloud_bus import cloud_config, model_config, update_payload

        self.core = AggregatorCore(cloud_config(tmpdir("fuzz-cloud-"), NOWHERE))
        tensors = {n: t.numpy().copy() for n, t in shared_state(build_edge_model(model_config(4))).items()}
        good = update_payload(tensors, site="s1", seq=1, base_version=0, fingerprint=base_fingerprint(model_config(4)),
                              rank=4)
        from broker.wire import decode_envelope

        self.templates: dict[Kind, Any] = {**DEVICE_TEMPLATES, Kind.ADAPTER: decode_envelope(good).body}
        self.inputs = 0

    def strategy(self) -> st.SearchStrategy[list[tuple[str, bytes]]]:
        @st.composite
        def script(draw: st.DrawFn) -> list[tuple[str, bytes]]:
            msgs = []
            for _ in range(draw(st.integers(1, 2))):
                site = draw(st.sampled_from(["s1", "s2"]))
                topic = topics.adapter_up(site) if draw(st.integers(0, 3)) else draw(topic_choices(site, ["d"]))
                if draw(st.integers(0, 2)):
                    body = draw(mutated(self.templates[Kind.ADAPTER]))
                    payload = pack(envelope_map(Kind.ADAPTER, body, sender="edge-s1",
                                                seq=draw(st.integers(0, 2**64 - 1))))
                else:
                    payload = draw(envelopes(self.templates))
                if draw(st.integers(0, 5)) == 0 and topic.startswith("megace/v1/") and len(payload) > 40:
                    parts = frames(topic, payload, sender="x", max_packet=256 + draw(st.integers(64, 8192)))
                    msgs += draw(st.permutations(parts))[: draw(st.integers(1, len(parts)))]
                else:
                    msgs.append((topic, payload))
            return msgs

        return script()

    def run(self, msgs: list[tuple[str, bytes]]) -> None:
        for topic, payload in msgs:
            self.inputs += 1
            try:
                self.core.ingest(topic, payload)
            except Exception as exc:
                raise PropertyViolation(f"AggregatorCore.ingest raised {type(exc).__name__}: {exc}") from exc


def service_target(name: str, harness: EdgeHarness | CloudHarness) -> Target:
    return Target(name, harness.strategy, harness.run)  # type: ignore[arg-type]
