"""Bad uploads over a real Mosquitto: each rejected with its reason on the edge's feedback topic
and in the metrics, never aggregated, and the service keeps running."""

from __future__ import annotations

from pathlib import Path

import msgpack
import numpy as np

from broker import topics
from broker.address import BrokerAddress
from broker.aio import make_client
from broker.chunking import frames
from broker.topics import Role
from broker.wire import Kind, SiteFeedback, decode_metrics, encode_envelope
from broker.wire.bodies import FeedbackView, decode_body
from cloud_aggregator.ledger import Ledger
from cloud_aggregator.service import running
from megace_model.adapters import build_edge_model, shared_state
from megace_model.fingerprint import base_fingerprint
from tests.support.cloud_bus import cloud_config, eventually, model_config, perturbed, update_payload
from tests.support.collector import Collector

RANK = 4
A_NAME = "base_model.model.backbone.encoder.layer.0.attention.self.query.lora_A.weight"
B_NAME = "base_model.model.backbone.encoder.layer.0.attention.self.query.lora_B.weight"


def tamper_chunk(payload: bytes, topic: str) -> list[tuple[str, bytes]]:
    """Chunk a valid upload, then flip bytes of one chunk's data (its sha256 no longer matches)."""
    parts = frames(topic, payload, sender="edge-chunk", seq=1, max_packet=4096)
    assert len(parts) > 2
    t, p = parts[1]
    env = msgpack.unpackb(p, raw=False)
    data = bytearray(env["b"]["data"])
    data[:8] = bytes(b ^ 0xFF for b in data[:8])
    env["b"]["data"] = bytes(data)
    parts[1] = (t, msgpack.packb(env, use_bin_type=True))
    return parts


async def test_each_bad_upload_is_rejected_with_its_reason(tmp_path: Path, fresh_mosquitto):
    addr = BrokerAddress(fresh_mosquitto.host, fresh_mosquitto.port)
    sites = ["g", "fp", "shape", "rank", "nan", "unknown", "norm", "stale", "future", "chunk", "garbage", "kind",
             "mismatch"]
    cfg = cloud_config(
        tmp_path / "cloud", addr,
        aggregation={"strategy": "hetlora", "buffer_k": 1, "max_staleness": 2},
        validation={"min_history": 3, "sites": sites},  # provisioned: each refusal reaches the site's feedback
        limits={"metrics_period_s": 0.3},
    )
    mcfg = model_config(RANK)
    clean = shared_state(build_edge_model(mcfg))
    fp = base_fingerprint(mcfg)
    good = {n: np.asarray(t) for n, t in perturbed(clean, seed=1).items()}

    def upload(site: str, seq: int, base: int = 0, tensors: dict | None = None, **kw) -> bytes:
        return update_payload(tensors if tensors is not None else perturbed(clean, seed=seq), site=site, seq=seq,
                              base_version=base, fingerprint=kw.pop("fingerprint", fp), rank=kw.pop("rank", RANK),
                              **kw)

    metrics_topic = topics.metrics(Role.CLOUD, cfg.cloud_id)
    filters = [f for s in sites for f in topics.subscriptions(topics.site_feedback(s))] + [metrics_topic]
    with Collector(addr, *filters) as col:
        async with running(cfg) as agg, make_client(addr, identifier="bad-edges") as client:
            core = agg.core
            assert core is not None

            async def send(site: str, payload: bytes) -> None:
                await client.publish(topics.adapter_up(site), payload, qos=1)

            def feedback(site: str) -> list[SiteFeedback]:
                return [b for t, e in col.envelopes if t == topics.site_feedback(site)
                        for b in [decode_body(e)] if isinstance(b, SiteFeedback)]

            # four honest updates from site g: four versions (buffer_k = 1), norm history armed
            for seq in range(1, 5):
                await send("g", upload("g", seq, base=core.version))
                await eventually(lambda seq=seq: core.version == seq, 20, what=f"version {seq}")

            bad_shape = dict(good)
            bad_shape[A_NAME] = np.zeros((RANK, 7), np.float32)
            bad_rank = {n: (t[:2] if ".lora_A." in n else t[:, :2]) for n, t in good.items()}
            bad_nan = dict(good)
            bad_nan[B_NAME] = good[B_NAME].copy()
            bad_nan[B_NAME][0, 0] = np.nan
            unknown = {**good, "base_model.model.head.weight": np.zeros((3, 128), np.float32)}
            huge = {n: (t * 1e3 if ".lora_B." in n else t) for n, t in perturbed(clean, seed=99).items()}

            await send("g", upload("g", 4, base=core.version))  # resent: duplicate
            await send("g", upload("g", 6, base=core.version))  # accepted (seq 5 skipped) ...
            await eventually(lambda: core.version == 5, 20, what="version 5")
            await send("g", upload("g", 5, base=core.version))  # ... so 5 is a replay
            await send("fp", upload("fp", 1, fingerprint="0" * 64))
            await send("shape", upload("shape", 1, tensors=bad_shape))
            await send("rank", upload("rank", 1, tensors=bad_rank))  # declares rank 4, carries rank 2
            await send("nan", upload("nan", 1, tensors=bad_nan))
            await send("unknown", upload("unknown", 1, tensors=unknown))
            await send("norm", upload("norm", 1, base=core.version, tensors=huge))
            await send("stale", upload("stale", 1, base=1))  # 4 versions behind, max 2
            await send("future", upload("future", 1, base=99))
            for t, p in tamper_chunk(upload("chunk", 1), topics.adapter_up("chunk")):
                await client.publish(t, p, qos=1)
            await send("garbage", b"\x93not an envelope")
            await send("kind", encode_envelope(Kind.FEEDBACK, "edge-kind", 1, {"global_version": 1}))
            await send("mismatch", upload("mismatch", 1, body_site="elsewhere"))

            expected = {
                "fp": "base_fingerprint", "shape": "shape", "rank": "rank", "nan": "non_finite",
                "unknown": "unknown_tensor", "norm": "norm_outlier", "stale": "stale", "future": "future_base",
                "chunk": "chunk_hash", "garbage": "bad_payload", "kind": "wrong_kind", "mismatch": "bad_metadata",
            }
            for site, reason in expected.items():
                fb = await eventually(lambda site=site: feedback(site), 20, what=f"feedback for {site}")
                assert [r.reason for r in fb[-1].rejected] == [reason], (site, fb[-1].rejected)
                assert fb[-1].accepted == [] and fb[-1].tensors == {}  # never accepted: no view
            g_fb = await eventually(lambda: [f for f in feedback("g") if len(f.rejected) == 2], 20, what="g's")
            assert [(r.seq, r.reason) for r in g_fb[-1].rejected] == [(4, "duplicate"), (5, "replayed")]
            assert g_fb[-1].accepted == [1, 2, 3, 4, 6] and g_fb[-1].rank == RANK
            # an acknowledgement names the cut of the global g has (before: it carried the whole view again)
            g_view = [FeedbackView.of(e.body) for t, e in col.envelopes if t == topics.site_feedback("g")
                      and len(decode_body(e).rejected) == 2][-1]
            assert g_fb[-1].tensors == {} and g_view.mode == "global"

            # still serving: an honest update after all that makes the next version
            await send("g", upload("g", 7, base=core.version))
            await eventually(lambda: core.version == 6, 20, what="version 6")

            def final() -> dict | None:
                docs = [decode_metrics(p)["metrics"] for t, p, _ in col.raw if t == metrics_topic]
                return docs[-1] if docs and docs[-1]["accepted"] == 6 else None

            m = await eventually(final, 20, what="metrics")
    want = {**{r: 1 for r in expected.values()}, "duplicate": 1, "replayed": 1}
    assert m["rejected_reasons"] == want and m["rejected"] == len(want)
    assert m["version"] == 6
    with Ledger(cfg.state_dir) as ledger:
        applied = [u for v in range(1, 7) for u in ledger.applied_in(v)]
        assert sorted(applied) == [("edge-g", s) for s in (1, 2, 3, 4, 6, 7)]  # nothing bad aggregated
        assert ledger.rejections() == []  # refusals are counted, not written
