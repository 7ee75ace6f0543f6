"""Cloud high availability: replicas on one PostgreSQL ledger, exactly one active, the leader killed with SIGKILL.

The end-to-end test runs three real ``python -m cloud_aggregator --ledger postgresql://...`` processes on a
Mosquitto of its own; the lease tests drive :class:`cloud_aggregator.leader.Lease` directly.  Timings are
recorded by ``bench/bench_cloud_failover.py``, never asserted here.
"""

from __future__ import annotations

import asyncio
import signal
import zlib
from pathlib import Path

import numpy as np
import psycopg
import pytest

from broker import topics
from broker.address import BrokerAddress
from broker.aio import make_client, publish
from broker.wire import GlobalAdapter
from cloud_aggregator.config import CloudConfigError, load_cloud_config, write_cloud_config
from cloud_aggregator.leader import Lease
from cloud_aggregator.ledger_base import LeaseLost
from cloud_aggregator.ledger_pg import PgLedger
from cloud_aggregator.service import CloudAggregator
from megace_common.postgres import PostgresServer
from megace_model.adapters import build_edge_model, shared_state
from megace_model.fingerprint import base_fingerprint
from tests.support import np_reference as ref
from tests.support.cloud_bus import cloud_config, eventually, model_config, perturbed, update_payload
from tests.support.cloud_ha import RANK, SAMPLES, Bus, digest, run_failover, start_replica
from tests.support.collector import Collector


async def test_kill_9_of_the_leader_a_standby_takes_over(tmp_path: Path, fresh_mosquitto, pg_url: str):
    addr = BrokerAddress(fresh_mosquitto.host, fresh_mosquitto.port)
    run = await run_failover(tmp_path, addr, pg_url, replicas=3, sites=4, rounds=6, kill_at=2)
    pids = set(run.logs)
    assert run.killed_pid in pids and run.new_leader_pid in pids - {run.killed_pid}
    [standby] = pids - {run.killed_pid, run.new_leader_pid}
    # exactly one replica active at a time: the one never elected never connected to the broker
    assert run.sessions[run.killed_pid] >= 1 and run.sessions[run.new_leader_pid] >= 1
    assert run.sessions[standby] == 0, run.logs[standby][-2000:]
    assert sorted(run.exit_codes) == [-9, 0, 0]  # the survivors stop cleanly on SIGTERM, standby included
    for pid in pids - {run.killed_pid}:
        assert "Traceback" not in run.logs[pid], run.logs[pid][-3000:]

    expected = {(f"edge-{s}", q) for s in run.sites for q in range(1, run.rounds + 1)}
    assert run.acked_at_kill < len(expected), "the kill must land mid-stream"
    assert run.acked == expected  # every upload was acknowledged in the end
    with PgLedger(pg_url) as led:
        final = led.latest_version()
        assert final is not None and final > run.killed_at_version
        assert led.pending_count() == 0
        applied = [u for v in range(1, final + 1) for u in led.applied_in(v)]
        assert sorted(applied) == sorted(expected), "every acknowledged upload applied exactly once"
        # no fork: each version was published with one content, the one committed, and every version was published
        assert sorted(run.published) == list(range(final + 1))
        assert run.dropped_versions == []  # the new leader's envelope seqs continue above the old one's
        for v, digests in run.published.items():
            stored = led.load_global(v)
            assert digests == {digest(GlobalAdapter(v, "", "", 1, 1.0, stored.arrays()))}, f"v{v} forked"
        assert run.retained_version == final  # what a subscriber arriving now gets
        # each version is exactly its predecessor plus the updates it consumed (plain numpy, the documented maths)
        prev = {n: t.astype(np.float64) for n, t in led.load_global(0).tensors.items()}
        for v in range(1, final + 1):
            ups, ds = [], []
            for edge_id, seq in led.applied_in(v):
                base, update = run.sent[(edge_id, seq)]
                ups.append(ref.Up({n: t.astype(np.float64) for n, t in update.items()}, RANK, 2.0 * RANK, SAMPLES))
                ds.append(ref.polynomial(v - 1 - base, 0.5))
            replay = ref.mix(prev, ref.aggregate("fedavg", prev, ups, ds), ref.steps(ups, ds))
            stored_v = {n: t.astype(np.float64) for n, t in led.load_global(v).tensors.items()}
            assert stored_v.keys() == replay.keys()
            for name in replay:
                np.testing.assert_allclose(stored_v[name], replay[name], rtol=2e-5, atol=2e-6, err_msg=f"v{v} {name}")
            prev = stored_v
    with psycopg.connect(pg_url) as db:
        epoch, holder = db.execute("SELECT epoch, holder FROM lease").fetchone()
        assert epoch >= 2 and holder.endswith(f":{run.new_leader_pid}")  # the first term, then the takeover's


async def test_uploads_sent_while_no_replica_is_active_wait_in_the_broker(tmp_path: Path, fresh_mosquitto,
                                                                          pg_url: str):
    """All replicas share one persistent MQTT session: what edges upload while none is active is queued by the
    broker and handed to the next leader (sent once, never resent here), then applied exactly once."""
    addr = BrokerAddress(fresh_mosquitto.host, fresh_mosquitto.port)
    sites = ["s0", "s1", "s2"]
    tensors = shared_state(build_edge_model(model_config(RANK)))
    fingerprint = base_fingerprint(model_config(RANK))
    filters = [*topics.subscriptions(topics.global_down()),
               *(f for s in sites for f in topics.subscriptions(topics.site_feedback(s)))]
    procs = []
    try:
        with Collector(addr, *filters) as col:
            bus = Bus(col)
            first = await _replica(tmp_path, "a", addr, pg_url)
            procs.append(first)
            await eventually(lambda: bus.version() >= 0, 180, what="v0")
            first.send_signal(signal.SIGKILL)
            await first.wait()
            async with make_client(addr, identifier="ha-queue-edge") as client:
                for s in sites:  # nobody is active now: the broker queues these for the shared session
                    payload = update_payload(perturbed(tensors, seed=zlib.crc32(s.encode())), site=s, seq=1,
                                             base_version=0, fingerprint=fingerprint, rank=RANK, samples=SAMPLES)
                    await publish(client, topics.adapter_up(s), payload, sender=f"edge-{s}", seq=1)
            procs.append(await _replica(tmp_path, "b", addr, pg_url))
            await eventually(lambda: all(bus.acked(s, 1) for s in sites), 180, what="the queued uploads acknowledged")
            await eventually(lambda: bus.version() >= 1, 60, what="v1 from the queued uploads")
        with PgLedger(pg_url) as led:
            assert sorted(led.applied_in(1)) == [(f"edge-{s}", 1) for s in sites]
            assert led.pending_count() == 0 and led.latest_version() == 1
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def _replica(tmp: Path, name: str, addr: BrokerAddress, url: str) -> asyncio.subprocess.Process:
    cfg = cloud_config(tmp / name, addr, aggregation={"strategy": "fedavg", "buffer_k": 3}, ledger={"poll_s": 0.2})
    return await start_replica(write_cloud_config(cfg, tmp / f"{name}.toml"), url, tmp / f"{name}.log")


async def test_a_deposed_leader_stops_its_session_and_stands_by(tmp_path: Path, fresh_mosquitto, pg_url: str):
    """An operator (or a replica that took over) bumps the epoch: the serving replica notices on its heartbeat,
    drops its MQTT session without a word, stands by, and leads again in a new term once the lease is free."""
    addr = BrokerAddress(fresh_mosquitto.host, fresh_mosquitto.port)
    cfg = cloud_config(tmp_path / "r", addr, aggregation={"buffer_k": 3},
                       ledger={"url": pg_url, "poll_s": 0.1, "heartbeat_s": 0.1})
    agg = CloudAggregator(cfg)
    stop = asyncio.Event()
    task = asyncio.create_task(agg.run(stop))
    try:
        await eventually(lambda: agg.ready.is_set() or task.done(), 180, what="the first term")
        assert not task.done() and agg.counters["leader_terms"] == 1 and agg.counters["connects"] == 1
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute("UPDATE lease SET epoch = epoch + 1")
        await eventually(lambda: agg.counters["leader_terms"] == 2, 60, what="a second term")
        await eventually(lambda: agg.counters["connects"] == 2, 60, what="a new session")
        assert agg.core is not None and agg.core.ledger.epoch == 3  # type: ignore[attr-defined]
        assert not task.done()
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


async def test_a_database_crash_deposes_the_leader_which_leads_again_after(tmp_path: Path, fresh_mosquitto):
    """PostgreSQL killed (``pg_ctl stop -m immediate``) under a serving replica: it stops serving instead of
    crashing, waits the outage out as a standby, and leads again at the same version once the database is back."""
    addr = BrokerAddress(fresh_mosquitto.host, fresh_mosquitto.port)
    with PostgresServer() as pg:
        url = pg.create_database()
        cfg = cloud_config(tmp_path / "r", addr, ledger={"url": url, "poll_s": 0.1, "heartbeat_s": 0.1})
        agg = CloudAggregator(cfg)
        stop = asyncio.Event()
        task = asyncio.create_task(agg.run(stop))
        try:
            await eventually(lambda: agg.ready.is_set() or task.done(), 180, what="the first term")
            assert not task.done() and agg.core is not None and agg.core.version == 0
            await asyncio.to_thread(pg.stop)
            await eventually(lambda: agg.core is None or agg.core.ledger._db.closed, 60,  # type: ignore[attr-defined]
                             what="the term to end")
            await asyncio.sleep(1.0)  # the outage: the replica keeps trying, it does not exit
            assert not task.done() and agg.counters["leader_terms"] == 1
            await asyncio.to_thread(pg.restart)
            await eventually(lambda: agg.counters["leader_terms"] == 2 and agg.counters["connects"] == 2, 120,
                             what="a second term after the outage")
            assert agg.core is not None and agg.core.version == 0  # the same ledger after the crash-restart
            with PgLedger(url) as led:
                assert led.latest_version() == 0
                (epoch,) = led._one("SELECT epoch FROM lease")
                assert epoch == 2  # the first term's committed bump survived the crash too
        finally:
            stop.set()
            await asyncio.wait_for(task, 60)


async def test_one_lease_holder_and_a_takeover_fences_the_old_one(pg_url: str):
    stop = asyncio.Event()
    a = Lease(pg_url, "a", poll_s=0.05, heartbeat_s=0.1)
    b = Lease(pg_url, "b", poll_s=0.05, heartbeat_s=0.1)
    assert await a.acquire(stop) and a.epoch == 1
    a_watch = asyncio.create_task(a.watch())
    b_wait = asyncio.create_task(b.acquire(stop))
    await asyncio.sleep(1.0)
    assert not b_wait.done(), "a second replica must stand by while the lease is held"
    ledger_a = PgLedger(pg_url, epoch=a.epoch)
    with psycopg.connect(pg_url, autocommit=True) as admin:  # a's lock session dies (as with SIGKILL or a cut)
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype='advisory' AND granted"
                      " AND objid = (x'63650002'::bigint)::oid")
    assert await asyncio.wait_for(b_wait, 30) is True and b.epoch == 2
    await asyncio.wait_for(a.lost.wait(), 30)  # the old holder notices on its next heartbeat
    await a_watch
    with pytest.raises(LeaseLost):  # and whatever it still tries to write is refused
        ledger_a.write_doc("late", b"x")
    ledger_a.close()
    await a.release()
    await b.release()
    c = Lease(pg_url, "c", poll_s=0.05)
    assert await asyncio.wait_for(c.acquire(stop), 30) and c.epoch == 3  # released: the next one gets it at once
    stop.set()
    d = Lease(pg_url, "d", poll_s=0.05)
    assert await d.acquire(stop) is False  # stopped while standing by
    await c.release()


async def test_a_standby_waits_out_a_database_that_is_down(tmp_path: Path):
    stop = asyncio.Event()
    lease = Lease("postgresql://postgres@127.0.0.1:1/nothing", "x", poll_s=0.05)
    task = asyncio.create_task(lease.acquire(stop))
    await asyncio.sleep(0.5)
    assert not task.done()
    stop.set()
    assert await asyncio.wait_for(task, 30) is False


def test_ledger_url_is_validated(tmp_path: Path):
    addr = BrokerAddress("127.0.0.1", 1883)
    with pytest.raises(CloudConfigError, match="postgresql://"):
        cloud_config(tmp_path, addr, ledger={"url": "mysql://db/x"})
    with pytest.raises(CloudConfigError, match="poll_s"):
        cloud_config(tmp_path, addr, ledger={"url": "postgresql://db/x", "poll_s": 0})
    cfg = cloud_config(tmp_path, addr, ledger={"url": "postgresql://u@db:5432/megace"})
    assert cfg.ledger.replicated and not cloud_config(tmp_path, addr).ledger.replicated


def test_the_deployed_ha_config_loads(tmp_path: Path):
    """``deploy/cloud/ha.toml`` appended to the example config is a valid replica config."""
    deploy = Path(__file__).resolve().parents[2] / "deploy"
    text = (deploy / "cloud.example.toml").read_text() + "\n" + (deploy / "cloud" / "ha.toml").read_text()
    (tmp_path / "cloud.toml").write_text(text)
    cfg = load_cloud_config(tmp_path / "cloud.toml", environ={})
    assert cfg.ledger.replicated and cfg.ledger.url.startswith("postgresql://megace_cloud@")
    assert (cfg.ledger.poll_s, cfg.ledger.heartbeat_s) == (0.5, 1.0)
    unit = (deploy / "cloud" / "megace-cloud-ha.conf").read_text()
    assert "Restart=always" in unit and "EnvironmentFile=-/etc/megace/cloud.env" in unit
