"""A simulated edge, run as its own process by the cloud service tests.

It builds the real seeded tiny edge model at its own LoRA rank, "trains" (perturbs its shared
adapter), uploads over MQTT with ``broker.aio.publish`` (chunked), waits for the cloud's
acknowledgement (its seq in the site feedback's ``accepted`` list; resends otherwise), then
loads its rank-truncated view into its model with ``load_shared``: the tensors the cloud sends, or, where the
feedback names a cut of the global (``view = "global"``), that cut of the global it received, made with
``megace_common.views.cut_view`` as a real edge does.
A slow edge keeps uploading on the base version it started from.

    python -m tests.support.sim_edge '{"host": ..., "port": ..., "site": "a", "rank": 8, ...}'

Writes a JSON report to ``args["result"]``; exits non-zero if any check fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import torch

from broker import topics
from broker.address import BrokerAddress
from broker.aio import make_client, publish
from broker.errors import WireError
from broker.inbox import Inbox
from broker.wire import GlobalAdapter, SiteFeedback
from broker.wire.bodies import VIEW_GLOBAL, VIEW_TENSORS, FeedbackView, decode_body
from megace_common.views import ViewCut, cut_view
from megace_model.adapters import build_edge_model, load_shared, shared_state
from megace_model.fingerprint import base_fingerprint
from tests.support.cloud_bus import model_config, perturbed, update_payload


class EdgeState:
    def __init__(self) -> None:
        self.globals: list[int] = []
        self.global_by_version: dict[int, GlobalAdapter] = {}
        self.feedback: list[SiteFeedback] = []
        self.views: list[FeedbackView] = []  # how each feedback gives its view, in the same order
        self.changed = asyncio.Event()

    async def wait(self, pred, timeout: float, what: str):  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not (value := pred()):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(what)
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(left, 0.5))
        return value


async def reader(client, state: EdgeState) -> None:  # type: ignore[no-untyped-def]
    inbox = Inbox()
    with contextlib.suppress(aiomqtt.MqttError):  # the client disconnecting at the end
        await _read(client, state, inbox)


async def _read(client, state: EdgeState, inbox: Inbox) -> None:  # type: ignore[no-untyped-def]
    async for msg in client.messages:
        try:
            got = inbox.accept(str(msg.topic), bytes(msg.payload))
        except WireError:
            continue  # e.g. an empty retained payload clearing a chunk topic
        if got is None:
            continue
        body = decode_body(got[1])
        if isinstance(body, GlobalAdapter):
            state.globals.append(body.version)
            state.global_by_version[body.version] = body
        elif isinstance(body, SiteFeedback):
            state.feedback.append(body)
            state.views.append(FeedbackView.of(got[1].body))
        state.changed.set()


async def main(args: dict[str, Any]) -> dict[str, Any]:
    site, rank = args["site"], int(args["rank"])
    cfg = model_config(rank)
    model = build_edge_model(cfg)
    fingerprint = base_fingerprint(cfg)
    modalities: dict[str, int] = args["modalities"]
    lacking = {m for m in cfg.modality_names if modalities.get(m, 0) == 0}
    addr = BrokerAddress(args["host"], int(args["port"]))
    report: dict[str, Any] = {"site": site, "rank": rank, "applied": [], "stats": [], "errors": []}
    state = EdgeState()
    async with make_client(addr, identifier=f"sim-edge-{site}") as client:
        for f in (*topics.subscriptions(topics.global_down()), *topics.subscriptions(topics.site_feedback(site))):
            await client.subscribe(f, qos=1)
        task = asyncio.create_task(reader(client, state))
        await state.wait(lambda: state.globals, 30, "retained global")
        base = max(state.globals)
        Path(args["ready"]).touch()
        while not Path(args["go"]).exists():
            await asyncio.sleep(0.05)

        for seq in range(1, int(args["rounds"]) + 1):
            if args.get("wait_version"):
                await state.wait(lambda: max(state.globals) >= int(args["wait_version"]), 60, "slow edge's wait")
            tensors = perturbed(shared_state(model), seed=zlib.crc32(f"{site}/{seq}".encode()))
            payload = update_payload(
                tensors, site=site, seq=seq, base_version=base, fingerprint=fingerprint, rank=rank,
                samples=int(args["samples"]), modalities=modalities,
            )

            def acked(seq: int = seq) -> SiteFeedback | None:
                return next((f for f in reversed(state.feedback) if seq in f.accepted), None)

            for _attempt in range(4):  # at-least-once: resend until the cloud lists the seq as accepted
                await publish(client, topics.adapter_up(site), payload, sender=f"edge-{site}", seq=seq,
                              max_packet=int(args["max_packet"]))
                try:
                    await state.wait(acked, 15, f"ack of {seq}")
                    break
                except TimeoutError:
                    report["errors"].append(f"resend {seq}")
            else:
                raise AssertionError(f"{site}#{seq} never acknowledged")

            # the view of a version that includes this upload (slow edges: any newer one), once it can be had
            def included(seq: int = seq) -> tuple[SiteFeedback, dict[str, np.ndarray]] | None:
                for f, view in zip(reversed(state.feedback), reversed(state.views), strict=True):
                    if f.stats.get("seq", -1) >= seq:
                        tensors = view_tensors(state, f, view, cfg.lora_alpha / rank)
                        if tensors is not None:
                            return f, tensors
                return None

            fb, view_arrays = await state.wait(included, 30, f"view including {seq}")
            apply_view(model, fb, view_arrays, rank, lacking, report)
            report["stats"].append(dict(fb.stats, version=fb.version))
            if not args.get("wait_version"):
                base = fb.version  # a fast edge trains on what it just received
        report["globals"] = sorted(set(state.globals))
        task.cancel()
    return report


def view_tensors(state: EdgeState, fb: SiteFeedback, view: FeedbackView,
                 scaling: float) -> dict[str, np.ndarray] | None:
    """The view ``fb`` gives: its tensors, or its cut of the global of its version (None until that arrives)."""
    if view.mode == VIEW_TENSORS:
        return dict(fb.tensors)
    g = state.global_by_version.get(fb.version)
    if view.mode != VIEW_GLOBAL or g is None:
        return None
    cut = ViewCut.from_wire(view, rank=fb.rank, scaling=scaling)
    return cut_view(g.tensors, cut, sent_scaling=g.alpha / g.rank)


def apply_view(model, fb: SiteFeedback, tensors: dict[str, np.ndarray], rank: int, lacking: set[str],  # type: ignore[no-untyped-def]
               report: dict[str, Any]) -> None:
    """Shapes must match this edge's rank, modules of modalities it lacks must be absent, and the
    model must hold exactly the view afterwards."""
    assert fb.rank == rank, (fb.rank, rank)
    for name, arr in tensors.items():
        if ".lora_A." in name:
            assert arr.shape[0] == rank, (name, arr.shape)
        if ".lora_B." in name:
            assert arr.shape[1] == rank, (name, arr.shape)
        assert not any(f"modality_proj.{m}." in name for m in lacking), name
    load_shared(model, tensors, strict=False)
    now = shared_state(model)
    for name, arr in tensors.items():
        assert torch.allclose(now[name], torch.from_numpy(np.array(arr)), atol=1e-6), name
    report["applied"].append({"version": fb.version, "tensors": len(tensors)})


if __name__ == "__main__":
    torch.set_num_threads(1)
    params = json.loads(sys.argv[1])
    result = asyncio.run(main(params))
    tmp = params["result"] + ".tmp"
    Path(tmp).write_text(json.dumps(result))
    os.replace(tmp, params["result"])
