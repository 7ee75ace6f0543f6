"""The real ``AggregatorCore`` driven in-process with real upload bytes, asserting on what it emits.

Every expected global is computed with ``np_reference`` (plain numpy from the documented formulas:
modality-aware hetlora / fedavg, the FedBuff step ``ᾱ = Σ d n / Σ n``, the polynomial staleness discount),
from the previous global *as the core published it* and the uploads as they were sent.
"""

from __future__ import annotations

import functools
import json
import sqlite3
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from broker import topics
from broker.address import BrokerAddress
from broker.chunking import frames
from broker.topics import Role
from broker.wire import GlobalAdapter, Kind, SiteFeedback, decode_envelope, decode_metrics, encode_envelope
from broker.wire.bodies import FeedbackView, decode_body
from cloud_aggregator.core import AggregatorCore
from cloud_aggregator.messages import Outgoing
from megace_model.adapters import build_edge_model, shared_state
from megace_model.fingerprint import base_fingerprint
from tests.support import np_reference as ref
from tests.support.cloud_bus import cloud_config, model_config, perturbed, update_payload

ADDR = BrokerAddress("127.0.0.1", 1)  # the core never connects
TOL = {"rtol": 2e-5, "atol": 2e-6}  # float32 on the wire and in the core, float64 in the reference


@functools.cache
def base_adapter(rank: int) -> dict[str, np.ndarray]:
    return {n: t.numpy().copy() for n, t in shared_state(build_edge_model(model_config(rank))).items()}


@functools.cache
def fingerprint() -> str:
    return base_fingerprint(model_config(4))


class Upload:
    """One edge upload: the bytes on the wire and the same update as a numpy ``ref.Up``."""

    def __init__(self, site: str, seq: int, base: int, rank: int, samples: int, modalities: dict[str, int],
                 **kw: object) -> None:
        self.site, self.seq = site, seq
        self.tensors = perturbed(base_adapter(rank), seed=zlib.crc32(f"{site}/{seq}".encode()), scale=0.05)
        self.payload = update_payload(self.tensors, site=site, seq=seq, base_version=base,
                                      fingerprint=str(kw.pop("fingerprint", fingerprint())), rank=rank,
                                      samples=samples, modalities=modalities, **kw)  # type: ignore[arg-type]
        self.up = ref.Up({n: t.astype(np.float64) for n, t in self.tensors.items()}, rank, 2.0 * rank, samples,
                         dict(modalities))


def decoded(out: list[Outgoing]) -> list[tuple[str, object]]:
    """(topic, body) of every emitted message, in order; metrics documents as dicts."""
    res: list[tuple[str, object]] = []
    for o in out:
        if o.topic.startswith(f"{topics.ROOT}/metrics/"):
            res.append((o.topic, decode_metrics(o.payload)["metrics"]))
        elif o.topic.startswith(f"{topics.ROOT}/events/"):  # the JSON event of a new global (docs/METRICS.md)
            res.append((o.topic, json.loads(o.payload)))
        else:
            res.append((o.topic, decode_body(decode_envelope(o.payload))))
    return res


def only(out: list[Outgoing], cls: type) -> list:  # type: ignore[type-arg]
    return [b for _, b in decoded(out) if isinstance(b, cls)]


def feedback_of(out: list[Outgoing], site: str) -> SiteFeedback:
    """The site's last feedback in ``out`` (the one that stays retained)."""
    return [b for b in only(out, SiteFeedback) if b.site == site][-1]


def view_of(out: list[Outgoing], site: str) -> FeedbackView:
    """How the site's last feedback in ``out`` gives its view."""
    return [FeedbackView.of(decode_envelope(o.payload).body) for o in out if o.topic == topics.site_feedback(site)][-1]


def send(core: AggregatorCore, u: Upload) -> list[Outgoing]:
    return core.ingest(topics.adapter_up(u.site), u.payload)


def as_f64(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {n: np.asarray(t, dtype=np.float64) for n, t in tensors.items()}


def assert_tensors(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for n, w in want.items():
        np.testing.assert_allclose(got[n], w, err_msg=n, **TOL)


def drift(u: ref.Up, g: dict[str, np.ndarray], wanted: set[str]) -> float:
    """‖s B A - B_g A_g‖ / ‖B_g A_g‖ over the edge's modules it receives (drift's documented meaning)."""
    num = den = 0.0
    for m, f in ref.pairs(u).items():
        if m in wanted:
            dg = g[f"{m}.lora_B.weight"] @ g[f"{m}.lora_A.weight"]
            num += float(np.sum((u.s * f["B"] @ f["A"] - dg) ** 2))
            den += float(np.sum(dg**2))
    return (num / den) ** 0.5


def test_core_flow_acks_refusals_restart_and_the_fedbuff_step(tmp_path: Path):
    """Replaces a hand-copied service: the real core's acknowledgements, refusals, globals and views."""
    cfg = cloud_config(
        tmp_path / "cloud", ADDR,
        aggregation={"strategy": "modality-aware", "strategy_options": {"inner": "hetlora"}, "buffer_k": 3,
                     "max_staleness": 2, "discount": "polynomial", "discount_options": {"a": 0.5},
                     "max_share": 1.0},  # the documented maths uncapped (a's 32 of 62 samples is above 1/2)
        validation={"min_history": 3, "sites": ["a", "b", "c", "x", "y"]},  # provisioned: refusals get feedback
    )
    both, image, audio = {"audio": 32, "image": 32}, {"audio": 0, "image": 20}, {"audio": 10, "image": 0}
    core = AggregatorCore(cfg)
    try:
        [v0] = only(core.announce(), GlobalAdapter)
        assert v0.version == 0 and core.version == 0 and v0.strategy == "modality-aware" and v0.contributors == []
        a1, b1, c1 = (Upload("a", 1, 0, 4, 32, both), Upload("b", 1, 0, 2, 20, image),
                      Upload("c", 1, 0, 4, 10, audio))
        out = send(core, a1)
        fb = feedback_of(out, "a")
        assert [t for t, _ in decoded(out)] == [topics.site_feedback("a")]  # acknowledged, nothing aggregated
        assert fb.accepted == [1] and fb.rejected == [] and fb.version == 0 and fb.rank == 4
        assert only(send(core, b1), SiteFeedback)[0].accepted == [1]
        out = send(core, c1)  # the third arrival fills the buffer (k = 3)
        assert [t for t, _ in decoded(out)] == [
            topics.site_feedback("c"), topics.global_down(),
            *(topics.site_feedback(s) for s in "abc"), topics.metrics(Role.CLOUD, cfg.cloud_id),
            topics.events(Role.CLOUD, cfg.cloud_id),  # the JSON event of the new global (docs/METRICS.md)
        ]
        [v1] = only(out, GlobalAdapter)
        assert v1.version == 1 and sorted(v1.contributors) == ["edge-a", "edge-b", "edge-c"]
        assert v1.strategy == "modality-aware"
        # fresh updates: ᾱ = 1, the global is the modality-aware (hetlora inside) average itself
        want_v1 = ref.aggregate("hetlora", as_f64(v0.tensors), [a1.up, b1.up, c1.up], None, ref.modality_weight)
        assert_tensors(as_f64(v1.tensors), want_v1)
        assert v1.rank == 4 and v1.alpha == 4.0

        # refusals, each on the offending site's feedback with its reason and no view
        out = send(core, a1)
        assert feedback_of(out, "a").rejected[-1].reason == "duplicate"
        assert feedback_of(out, "a").accepted == [1]
        out = send(core, Upload("a", 0, 1, 4, 32, both))  # a new seq below the last accepted one
        assert [(r.seq, r.reason) for r in feedback_of(out, "a").rejected] == [(1, "duplicate"), (0, "replayed")]
        for site, kw, reason in (("x", {"fingerprint": "0" * 64}, "base_fingerprint"), ("y", {}, "future_base")):
            fb = feedback_of(send(core, Upload(site, 1, 7 if site == "y" else 1, 4, 8, both, **kw)), site)
            assert [(r.seq, r.reason) for r in fb.rejected] == [(1, reason)]
            assert fb.accepted == [] and fb.tensors == {} and fb.rank == 0
        with sqlite3.connect(tmp_path / "cloud" / "ledger.sqlite") as db:  # a refusal costs no disk write
            assert list(db.execute("SELECT * FROM rejections")) == []
        a2, b2 = Upload("a", 2, 1, 4, 32, both), Upload("b", 2, 0, 2, 20, image)  # b is one version stale
        assert feedback_of(send(core, a2), "a").accepted == [1, 2]
        assert feedback_of(send(core, b2), "b").accepted == [1, 2]
    finally:
        core.close()

    core = AggregatorCore(cfg)  # restart with two updates buffered
    try:
        assert core.version == 1 and core.buffer.pending == 2
        out = core.announce()
        [again] = only(out, GlobalAdapter)
        assert again.version == 1
        assert_tensors(as_f64(again.tensors), as_f64(v1.tensors))
        assert {fb.site: fb.accepted for fb in only(out, SiteFeedback)} == {"a": [1, 2], "b": [1, 2], "c": [1]}
        c2 = Upload("c", 2, 1, 4, 10, audio)
        started = time.perf_counter()
        out = send(core, c2)
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        [v2] = only(out, GlobalAdapter)
        assert v2.version == 2
        # FedBuff: b's discount is re-evaluated at aggregation time, (1 + 1)^-1/2; the step per module is
        # Σ d n / Σ n over the edges eligible for it, from the v1 the core published
        ups, ds = [a2.up, b2.up, c2.up], [1.0, ref.polynomial(1, 0.5), 1.0]
        agg = ref.aggregate("hetlora", as_f64(v1.tensors), ups, ds, ref.modality_weight)
        steps = ref.steps(ups, ds, ref.modality_weight)
        assert steps["base_model.model.modality_proj.image"] == pytest.approx((32 + 20 * 2**-0.5) / 52)
        want_v2 = ref.mix(as_f64(v1.tensors), agg, steps)
        assert_tensors(as_f64(v2.tensors), want_v2)

        fb_b = feedback_of(out, "b")
        assert fb_b.version == 2 and fb_b.rank == 2 and fb_b.accepted == [1, 2]
        st = fb_b.stats
        assert st["staleness"] == 1.0 and st["discount"] == pytest.approx(2**-0.5)
        assert st["weight"] == pytest.approx(2**-0.5 * 20 / (32 + 20 + 10))  # d n / Σ n with the FedBuff step
        assert st["updates"] == 1.0 and st["samples"] == 20.0 and st["seq"] == 2.0 and st["last_seq"] == 2.0
        wanted_b = {m for m in ref.pairs(b2.up) if ref.modality(m) != "audio"}
        assert st["drift"] == pytest.approx(drift(b2.up, want_v2, wanted_b), rel=1e-4)
        # b's view: no audio module (it has no audio samples), rank 2, B divided by b's alpha / r = 2
        want_view = {n: ref.fit_rank(t, ref.split(n)[1], 2) / (2.0 if ".lora_B." in n else 1.0)
                     for n, t in want_v2.items() if ref.modality(n) != "audio"}
        # (before: the tensors themselves) it is a cut of the global b receives anyway, so the feedback only
        # names the cut, and that cut of the v2 as published (numpy, here) is the view
        view = view_of(out, "b")
        assert fb_b.tensors == {} and view == FeedbackView("global", ("image",), "AB")
        assert_tensors({n: ref.fit_rank(t.astype(np.float64), ref.split(n)[1], fb_b.rank) / (2.0 if ".lora_B." in n
                                                                                            else 1.0)
                        for n, t in v2.tensors.items() if ref.modality(n) in (None, *view.modalities)}, want_view)
        assert feedback_of(out, "a").stats["weight"] == pytest.approx(32 / 62)

        [metrics] = [b for t, b in decoded(out) if t == topics.metrics(Role.CLOUD, cfg.cloud_id)]
        assert metrics["version"] == 2 and metrics["accepted"] == 6 and metrics["pending"] == 0
        assert metrics["rejected"] == 0 and metrics["rejected_reasons"] == {}  # refusals are counted in memory only
        assert metrics["sites"] == 3 and metrics["contributors"] == 3
        assert metrics["staleness"] == {"mean": pytest.approx(1 / 3), "max": 1}
        meta = core.ledger.load_global(2).meta
        assert 0.0 < meta["aggregation_ms"] <= elapsed_ms  # measured inside the call that aggregated
        assert meta["n_updates"] == 3 and meta["contributors"] == ["edge-a", "edge-b", "edge-c"]
        assert meta["fingerprint"] == fingerprint() and meta["staleness"] == {"mean": pytest.approx(1 / 3), "max": 1}
        assert core.ledger.applied_in(1) == [("edge-a", 1), ("edge-b", 1), ("edge-c", 1)]
        assert core.ledger.applied_in(2) == [("edge-a", 2), ("edge-b", 2), ("edge-c", 2)]
    finally:
        core.close()


@pytest.mark.parametrize(
    "discount,options,step,factor",
    [
        ("polynomial", {"a": 0.5}, True, (1 + 3) ** -0.5),
        ("hinge", {"a": 2.0, "b": 1}, True, 1 / (2.0 * (3 - 1) + 1)),
        ("constant", {}, True, 1.0),
        ("polynomial", {"a": 1.0}, False, 1.0),  # without the FedBuff step a lone update replaces the global
    ],
)
def test_a_stale_update_moves_the_global_by_the_documented_factor(tmp_path: Path, discount, options, step, factor):
    """One update three versions late, alone in its batch: v4 = v3 + d(3)·(update - v3), d from the formula."""
    cfg = cloud_config(
        tmp_path / "cloud", ADDR,
        aggregation={"strategy": "fedavg", "buffer_k": 1, "discount": discount, "discount_options": options,
                     "staleness_step": step},
    )
    core = AggregatorCore(cfg)
    try:
        both = {"audio": 5, "image": 5}
        for seq in (1, 2, 3):
            send(core, Upload("fresh", seq, core.version, 4, 16, both))
        assert core.version == 3
        [v3] = only(core.announce(), GlobalAdapter)
        late = Upload("late", 1, 0, 4, 16, both)
        out = send(core, late)
        [v4] = only(out, GlobalAdapter)
        update = {n: late.up.s * t if ".lora_B." in n else t for n, t in late.up.tensors.items()}
        want = {n: v3.tensors[n] + factor * (update[n] - v3.tensors[n]) for n in update}
        assert_tensors(as_f64(v4.tensors), want)
        st = feedback_of(out, "late").stats
        assert st["staleness"] == 3.0
        d = {"polynomial": (1 + 3) ** -options.get("a", 0), "hinge": factor, "constant": 1.0}[discount]
        assert st["discount"] == pytest.approx(d)
        assert st["weight"] == pytest.approx(d if step else 1.0)  # its coefficient in the step
    finally:
        core.close()


def test_transport_failures_are_refused_with_their_reason(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """Bytes that never become an update: attributed to the site when the topic names one."""
    core = AggregatorCore(cloud_config(tmp_path / "cloud", ADDR, limits={"feedback_history": 2},
                                       validation={"sites": ["g", "k", "m", "f"]}))
    caplog.set_level("INFO", logger="cloud_aggregator.core")
    try:
        fb = feedback_of(core.ingest(topics.adapter_up("g"), b"\x93not an envelope"), "g")
        assert [(r.seq, r.reason) for r in fb.rejected] == [(0, "bad_payload")]
        fb = feedback_of(core.ingest(topics.adapter_up("g"), b"\x93not an envelope"), "g")
        assert [(r.seq, r.reason) for r in fb.rejected] == [(0, "bad_payload")] * 2
        fb = feedback_of(core.ingest(topics.adapter_up("g"), b"\x93not an envelope"), "g")
        assert len(fb.rejected) == 2  # feedback_history bounds the refusals repeated to a site
        fb = feedback_of(core.ingest(topics.adapter_up("k"), encode_envelope(Kind.FEEDBACK, "edge-k", 5,
                                                                            {"global_version": 1})), "k")
        assert [(r.seq, r.reason) for r in fb.rejected] == [(5, "wrong_kind")]
        u = Upload("m", 3, 0, 4, 8, {"audio": 1, "image": 1}, body_site="elsewhere")
        fb = feedback_of(send(core, u), "m")
        assert [(r.seq, r.reason) for r in fb.rejected] == [(3, "bad_metadata")]
        assert core.ingest(topics.site_feedback("z"), u.payload) == []  # not an uplink: dropped, counted
        assert core.ingest("elsewhere/entirely", b"junk") == []
        assert core.ingest("elsewhere/again", b"junk") == []
        assert core.aggregate() == [] and core.version == 0  # nothing pending: no empty version minted
        long = Upload("f", 1, 0, 4, 8, {"audio": 1, "image": 1}, fingerprint="f" * 600)
        assert feedback_of(send(core, long), "f").rejected[0].reason == "base_fingerprint"
        assert core.ledger.rejections() == []  # no disk write for a refusal
        # the log says why (rate-limited per reason; these are well under the limit)
        details = [r.getMessage() for r in caplog.records if r.getMessage().startswith("rejected ")]
        assert "msgpack" in details[0].lower() or "decode" in details[0].lower(), details[0]
        assert details[3] == "rejected k#5: wrong_kind expected an adapter, got 'feedback'"
        assert details[4] == "rejected m#3: bad_metadata body says site 'elsewhere', topic says 'm'"
        want = f"rejected f#1: base_fingerprint {f'{chr(102) * 600!r} != {fingerprint()!r}'[:200]}"
        assert details[5] == want  # bounded: a client picks its length
        m = core.metrics()
        assert m["wire_errors"] == 4 + 2 and m["accepted"] == 0 and m["version"] == 0 and m["strategy"] == "fedavg"
        assert m["staleness"] == {"mean": 0.0, "max": 0} and m["contributors"] == 0 and m["sites"] == 0
        assert m["aggregation_ms"] == 0.0 and m["pending"] == 0  # nothing aggregated yet
        # the last one names no site: counted by its reason only
        assert m["rejected_reasons"] == {"bad_payload": 3, "wrong_kind": 1, "bad_metadata": 1, "bad_topic": 2,
                                       "base_fingerprint": 1}
        sizes = [3 * len(b"\x93not an envelope"), len(long.payload), 2 * len(u.payload), 2 * len(b"junk"),
                 len(encode_envelope(Kind.FEEDBACK, "edge-k", 5, {"global_version": 1}))]
        assert m["bytes_in"] == sum(sizes)
    finally:
        core.close()


def huge(u: Upload) -> Upload:
    """The same upload with B scaled by 10^4: a norm far outside any honest spread."""
    big = {n: t * 1e4 if ".lora_B." in n else t for n, t in u.tensors.items()}
    u.payload = update_payload(big, site=u.site, seq=u.seq, base_version=0, fingerprint=fingerprint(), rank=4,
                               samples=8)
    return u


@pytest.mark.parametrize("bound", [{"ratio_max": 0, "min_spread": 0.05, "max_norm": 1e12},
                                   {"z_max": 0, "max_norm": 1e12}], ids=["z-test", "ratio-test"])
def test_restart_rearms_the_norm_guard_and_never_reuses_a_seq(tmp_path: Path, bound: dict):
    """Each norm bound alone (the other switched off with 0) refuses an outlier, also right after a restart.

    A 3x larger update passes the 10x ratio bound but not a z test whose spread floor is only 0.05.  The
    absolute bound (armed from the first upload) is lifted here so that the statistical ones are what refuses.
    """
    bound = {**bound, "sites": ["g", "h", "k", "j"]}
    cfg = cloud_config(tmp_path / "cloud", ADDR, aggregation={"buffer_k": 100},
                       validation={"min_history": 3, **bound}, limits={"feedback_history": 2})
    both = {"audio": 4, "image": 4}
    core = AggregatorCore(cfg)
    try:
        seqs = [o.seq for seq in (1, 2, 3) for o in send(core, Upload("g", seq, 0, 4, 8, both))]
        first, second = core.announce(), core.announce()
        assert first[0].payload == second[0].payload  # the same version is re-published as the same message
        seqs += [o.seq for o in first + second]
        assert feedback_of(first, "g").accepted == [2, 3]  # the last feedback_history seqs
    finally:
        core.close()
    core = AggregatorCore(cloud_config(tmp_path / "cloud", ADDR, validation={"min_history": 3, **bound}))
    try:
        out = core.announce()  # buffer_k is 3 now: the restart finds a full buffer and aggregates it
        assert [g.version for g in only(out, GlobalAdapter)] == [0, 1]
        st = feedback_of(out, "g").stats
        assert st["updates"] == 3.0 and st["weight"] == pytest.approx(1.0) and st["samples"] == 24.0
        out = send(core, huge(Upload("h", 1, 0, 4, 8, both)))
        assert [r.reason for r in feedback_of(out, "h").rejected] == ["norm_outlier"]  # judged after a restart
        triple = Upload("k", 1, 1, 4, 8, both)
        triple.payload = update_payload({n: 3 * t if ".lora_B." in n else t for n, t in triple.tensors.items()},
                                        site="k", seq=1, base_version=1, fingerprint=fingerprint(), rank=4,
                                        samples=8, modalities=both)
        fb = feedback_of(send(core, triple), "k")
        assert (fb.accepted, [r.reason for r in fb.rejected]) == (
            ([], ["norm_outlier"]) if "min_spread" in bound else ([1], []))
        assert min(o.seq for o in out) > max(seqs)  # receivers drop a seq at or below the last one seen
        fb = feedback_of(send(core, Upload("j", 1, 1, 4, 8, both)), "j")
        assert fb.accepted == [1] and fb.stats["weight"] == 0.0 and fb.stats["updates"] == 0.0  # not aggregated yet
        assert fb.stats["last_seq"] == 1.0 and fb.stats["version"] == 1.0
        core.sent(1000)
        core.sent(234)
        m = core.metrics()
        pending = 1 if "min_spread" in bound else 2  # j, and k when the ratio test let it through
        assert m["bytes_out"] == 1234 and m["pending"] == pending and m["version"] == 1
        assert m["aggregation_ms"] == core.ledger.load_global(1).meta["aggregation_ms"] > 0
    finally:
        core.close()


def test_configuration_reaches_the_core(tmp_path: Path):
    """No staleness limit (-1), the norm guard off, and keep_globals pruning, as configured."""
    cfg = cloud_config(tmp_path / "cloud", ADDR, aggregation={"buffer_k": 1, "max_staleness": -1},
                       validation={"norm_guard": False, "min_history": 1}, limits={"keep_globals": 1})
    both = {"audio": 4, "image": 4}
    core = AggregatorCore(cfg)
    try:
        for seq in range(1, 4):
            send(core, Upload("g", seq, core.version, 4, 8, both))
        out = send(core, huge(Upload("h", 1, 0, 4, 8, both)))  # 3 versions stale and huge: still accepted
        assert feedback_of(out, "h").accepted == [1] and core.version == 4
        assert sorted(p.name for p in (tmp_path / "cloud" / "globals").iterdir()) == ["v00000004.safetensors"]
    finally:
        core.close()


def test_fedsa_core_accepts_a_alone_and_never_sends_b(tmp_path: Path):
    cfg = cloud_config(tmp_path / "cloud", ADDR, aggregation={"strategy": "fedsa", "buffer_k": 2, "max_share": 1.0})
    both = {"audio": 4, "image": 4}
    core = AggregatorCore(cfg)
    try:
        ups = [Upload(s, 1, 0, 4, n, both) for s, n in (("p", 10), ("q", 30))]
        for u in ups:
            u.tensors = {n: t for n, t in u.tensors.items() if ".lora_A." in n}
            u.up.tensors = {n: t.astype(np.float64) for n, t in u.tensors.items()}
            u.payload = update_payload(u.tensors, site=u.site, seq=1, base_version=0, fingerprint=fingerprint(),
                                       rank=4, samples=u.up.samples, modalities=both)
        send(core, ups[0])
        out = send(core, ups[1])
        [v1] = only(out, GlobalAdapter)
        assert_tensors(as_f64(v1.tensors), ref.aggregate("fedsa", None, [u.up for u in ups]))
        assert not any(".lora_B." in n for n in feedback_of(out, "p").tensors)
        assert view_of(out, "p").factors == "A"  # the edge cuts only A from the global: its B stays its own
    finally:
        core.close()


def test_stacked_strategy_ignores_the_fedbuff_step(tmp_path: Path):
    """flora's global is not in factor coordinates: a lone stale update's ΔW becomes the global's ΔW exactly."""
    cfg = cloud_config(tmp_path / "cloud", ADDR, aggregation={"strategy": "flora", "buffer_k": 1})
    both = {"audio": 4, "image": 4}
    core = AggregatorCore(cfg)
    try:
        send(core, Upload("g", 1, 0, 4, 8, both))
        late = Upload("late", 1, 0, 4, 8, both)  # one version stale
        out = send(core, late)
        [v2] = only(out, GlobalAdapter)
        for m, f in ref.pairs(late.up).items():
            got = v2.tensors[f"{m}.lora_B.weight"].astype(np.float64) @ v2.tensors[f"{m}.lora_A.weight"]
            np.testing.assert_allclose(got, late.up.s * f["B"] @ f["A"], rtol=1e-4, atol=1e-6)
        st = feedback_of(out, "late").stats
        assert st["discount"] == pytest.approx(2**-0.5) and st["weight"] == pytest.approx(1.0)  # d n / Σ d n
        assert core.ledger.load_global(2).meta["svd_sorted"] == []  # the strategy's own metadata is kept
    finally:
        core.close()


def test_chunked_uploads_are_reassembled_and_oversize_ones_refused(tmp_path: Path):
    cfg = cloud_config(tmp_path / "cloud", ADDR, limits={"max_payload_bytes": 32_000, "max_transfers": 1},
                       validation={"sites": ["c", "d", "o", "n"]})
    core = AggregatorCore(cfg)
    try:
        u = Upload("c", 1, 0, 4, 8, {"audio": 1, "image": 1})
        parts = frames(topics.adapter_up("c"), u.payload, sender="edge-c", seq=1, max_packet=4096)
        assert len(parts) > 3 and len(u.payload) < 32_000
        for t, p in parts[:-1]:
            assert core.ingest(t, p) == []  # a chunk stored, nothing to say yet
        other = Upload("d", 1, 0, 4, 8, {"audio": 1, "image": 1})
        first = frames(topics.adapter_up("d"), other.payload, sender="edge-d", seq=1, max_packet=4096)[0]
        fb = feedback_of(core.ingest(*first), "d")  # max_transfers = 1: a second transfer must wait its turn
        assert [(r.seq, r.reason) for r in fb.rejected] == [(1, "chunk_limit")]
        fb = feedback_of(core.ingest(*parts[-1]), "c")
        assert fb.accepted == [1] and core.inbox.reassembler.completed == 1
        big = Upload("o", 1, 0, 8, 8, {"audio": 1, "image": 1})
        assert len(big.payload) > 32_000
        fb = feedback_of(send(core, big), "o")
        assert [(r.seq, r.reason) for r in fb.rejected] == [(1, "oversize")]
        first = frames(topics.adapter_up("o"), big.payload, sender="edge-o", seq=2, max_packet=4096)[0]
        fb = feedback_of(core.ingest(*first), "o")  # chunked, the same bound applies to the announced size
        assert [(r.seq, r.reason) for r in fb.rejected] == [(1, "oversize"), (2, "oversize")]
        body = encode_envelope(Kind.ADAPTER, "edge-n", 9, {"site": "n"})  # an adapter envelope, unreadable body
        fb = feedback_of(core.ingest(topics.adapter_up("n"), body), "n")
        assert [r.seq for r in fb.rejected] == [9] and fb.rejected[0].reason == "bad_payload"
        assert core.ledger.rejections() == []
    finally:
        core.close()


def test_the_buffer_timer_aggregates_on_the_injected_clock(tmp_path: Path):
    """FedBuff's timer: with fewer than k updates, a version is made once buffer_period_s has passed."""
    now = [100.0]
    cfg = cloud_config(tmp_path / "cloud", ADDR, aggregation={
        "strategy": "modality-aware", "buffer_k": 10, "buffer_period_s": 5.0, "min_updates": 2})
    core = AggregatorCore(cfg, clock=lambda: now[0])
    try:
        [v0] = only(core.announce(), GlobalAdapter)
        both = {"audio": 0, "image": 1}  # nobody has audio: its module must stay as it was
        send(core, Upload("t", 1, 0, 4, 0, both))  # an edge may report zero samples
        now[0] = 106.0
        assert core.maybe_aggregate() == []  # timer due, but min_updates is 2
        send(core, Upload("u", 1, 0, 4, 0, both))  # the second arrival finds the timer due
        assert core.version == 1
        [v1] = only(core.announce(), GlobalAdapter)
        audio = [n for n in v0.tensors if ref.modality(n) == "audio"]
        assert audio and all(np.array_equal(v1.tensors[n], v0.tensors[n]) for n in audio)
        st = core.glob.meta["site_stats"]
        assert st["t"]["weight"] == st["u"]["weight"] == 0.5  # no samples at all: every update counts equally
        now[0] = 110.0
        send(core, Upload("t", 2, 1, 4, 1, both))
        send(core, Upload("u", 2, 1, 4, 0, both))
        assert core.version == 1  # the window restarted at 106: not due before 111
        now[0] = 111.0
        assert [g.version for g in only(core.maybe_aggregate(), GlobalAdapter)] == [2]
        st = core.glob.meta["site_stats"]
        assert (st["t"]["weight"], st["u"]["weight"]) == (1.0, 0.0)  # by samples: 1 of 1
    finally:
        core.close()


def test_schema_and_rank_bound_come_from_the_served_model(tmp_path: Path):
    """Also: max_staleness = 0 means "fresh only" (only -1 lifts the limit), and the state_dir may be nested."""
    core = AggregatorCore(cloud_config(tmp_path / "deep" / "state" / "cloud", ADDR,
                                       aggregation={"buffer_k": 1, "max_staleness": 0},
                                       validation={"sites": ["w", "x", "y"]}))  # lora_r = 8
    try:
        both = {"audio": 1, "image": 1}
        u = Upload("w", 1, 0, 8, 8, both)
        wide = {n: np.concatenate([t, np.zeros((1, t.shape[1]), t.dtype)]) if ".lora_A." in n else
                np.concatenate([t, np.zeros((t.shape[0], 1), t.dtype)], axis=1) for n, t in u.tensors.items()}
        u.payload = update_payload(wide, site="w", seq=1, base_version=0, fingerprint=fingerprint(), rank=9,
                                   modalities=both)
        assert feedback_of(send(core, u), "w").rejected[0].reason == "rank"  # above the served lora_r
        u = Upload("x", 1, 0, 4, 8, both)
        u.payload = update_payload({**u.tensors, "base_model.model.extra.weight": np.zeros(3, np.float32)},
                                   site="x", seq=1, base_version=0, fingerprint=fingerprint(), rank=4,
                                   modalities=both)
        assert feedback_of(send(core, u), "x").rejected[0].reason == "unknown_tensor"  # not in the schema
        assert feedback_of(send(core, Upload("y", 1, 0, 8, 8, both)), "y").accepted == [1]  # rank 8 is fine
        assert core.version == 1
        assert feedback_of(send(core, Upload("y", 2, 0, 8, 8, both)), "y").rejected[-1].reason == "stale"
    finally:
        core.close()


def test_server_optimizer_state_survives_a_restart(tmp_path: Path):
    """FedAvgM's momentum is saved with each version: a restart between two versions changes nothing."""
    agg = {"buffer_k": 1, "server_optimizer": "sgd", "server_optimizer_options": {"lr": 1.0, "momentum": 0.5}}
    both = {"audio": 1, "image": 1}
    ups = [Upload("s", seq, seq - 1, 4, 8, both) for seq in (1, 2)]
    straight = AggregatorCore(cloud_config(tmp_path / "straight", ADDR, aggregation=agg))
    try:
        for u in ups:
            send(straight, u)
        [want] = only(straight.announce(), GlobalAdapter)
    finally:
        straight.close()
    for u in ups:
        core = AggregatorCore(cloud_config(tmp_path / "restarted", ADDR, aggregation=agg))
        try:
            send(core, u)
            [got] = only(core.announce(), GlobalAdapter)
        finally:
            core.close()
    assert got.version == want.version == 2
    assert_tensors(as_f64(got.tensors), as_f64(want.tensors))
    g = as_f64(want.tensors)
    plain = {n: ref.pad(ups[1].up.s * t if ".lora_B." in n else t, g[n].shape) for n, t in ups[1].up.tensors.items()}
    assert max(float(np.abs(g[n] - plain[n]).max()) for n in plain) > 1e-3  # momentum carried it past the aggregate


def test_a_stacked_strategy_with_a_server_optimizer_is_refused_at_start(tmp_path: Path):
    with pytest.raises(ValueError, match="server optimizer"):
        AggregatorCore(cloud_config(tmp_path / "cloud", ADDR,
                                    aggregation={"strategy": "flexlora", "server_optimizer": "sgd"}))
