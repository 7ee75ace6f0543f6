"""The ledger's guarantees on PostgreSQL (and the same checks on sqlite, for parity), plus the fencing that keeps a
deposed replica from writing.

Each test gets an empty database of the session's private cluster (``tests/cloud/conftest.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import psycopg
import pytest
from safetensors.numpy import load as st_load

from cloud_aggregator.contribution import GlobalState
from cloud_aggregator.errors import DuplicateUpdate
from cloud_aggregator.ledger import Ledger, open_ledger
from cloud_aggregator.ledger_base import LeaseLost, LedgerBackend, VersionConflict
from cloud_aggregator.ledger_pg import PgLedger
from cloud_aggregator.messages import SeqReserve
from cloud_aggregator.sites import SiteBook
from cloud_aggregator.strategies import get_strategy
from tests.support.cloud_testkit import make_contribution

MODS = {"q": (6, 5)}
Opener = Callable[[], LedgerBackend]


def contrib(edge: int, seq: int, **kw):  # type: ignore[no-untyped-def]
    return make_contribution(edge, 2, MODS, seq=seq, modalities={"audio": 3}, **kw)


@pytest.fixture(params=["sqlite", "postgresql"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens the same ledger again and again (a reopen after a crash); both backends."""
    url = "" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    opened: list[LedgerBackend] = []

    def open_() -> LedgerBackend:
        led = open_ledger(url, tmp_path)
        opened.append(led)
        return led

    yield open_
    for led in opened:
        led.close()


def test_accept_dedup_and_reopen(opener: Opener):
    led = opener()
    c = contrib(1, 1)
    uid = led.accept(c, received_version=0, weight=0.5, norm=1.0, digest="d1", steps={"q": 0.25})
    assert led.seen("edge-1", 1) and not led.seen("edge-1", 2) and not led.seen("edge-2", 1)
    assert led.seen_content("edge-1", "d1") and not led.seen_content("edge-1", "d2")
    assert led.last_seq("edge-1") == 1 and led.last_seq("edge-9") is None
    with pytest.raises(DuplicateUpdate, match=r"^duplicate: edge-1#1$"):
        led.accept(contrib(1, 1, seed=99), received_version=0, weight=1.0)
    led.reject("edge-3", 4, "norm_outlier", "too big")
    led2 = opener()  # a second handle, as a restarted (or another) replica sees it
    [p] = led2.pending()
    assert p.id == uid and p.weight == 0.5 and p.received_version == 0
    assert p.contribution.modalities == {"audio": 3} and p.contribution.alpha == c.alpha
    for name, t in c.tensors.items():
        assert np.array_equal(p.contribution.tensors[name], t)  # the winning copy, not the duplicate
    assert led2.rejections() == [("edge-3", 4, "norm_outlier")]
    assert led2.recent_steps(5) == [{"q": 0.25}] and led2.counts() == (1, {"norm_outlier": 1})


def test_commit_marks_applied_once_and_resumes_version(opener: Opener):
    s = get_strategy("fedavg")
    led = opener()
    assert led.latest_global() is None and led.latest_version() is None
    ids = [led.accept(contrib(i, 1), 0, 1.0) for i in range(3)]
    g = s.aggregate(None, [p.contribution for p in led.pending()[:2]])
    led.commit_global(g, ids[:2], server_state={"m/q": np.ones(2, np.float32)})
    assert led.pending_count() == 1
    with pytest.raises(VersionConflict, match=r"^1 of the updates are not pending$"):  # the same updates again
        led.commit_global(GlobalState(2, g.tensors, "fedavg"), ids[:1])
    with pytest.raises(VersionConflict, match=r"^version 5 after 1$"):  # skipping a version
        led.commit_global(GlobalState(5, g.tensors, "fedavg"), ids[2:])
    with pytest.raises(VersionConflict):  # repeating one
        led.commit_global(GlobalState(1, g.tensors, "fedavg"), ids[2:])
    assert led.latest_version() == 1 and led.pending_count() == 1  # failed commits changed nothing
    back = opener().latest_global()
    assert back is not None and back.version == 1 and back.strategy == "fedavg"
    for name, t in g.tensors.items():
        assert np.array_equal(back.tensors[name], t)
    led2 = opener()
    assert np.array_equal(led2.server_state()["m/q"], np.ones(2, np.float32))
    assert [p.id for p in led2.pending()] == [ids[2]] and led2.applied_in(1) == [("edge-0", 1), ("edge-1", 1)]


def test_every_field_survives_a_reopen_and_queries_match(opener: Opener):
    c = make_contribution(4, 3, MODS, seq=7, base_version=2, alpha=5.0, samples=17,
                          modalities={"audio": 2, "image": 9}, fingerprint="fp-x")
    uid = opener().accept(c, received_version=5, weight=0.25, norm=3.5)
    led = opener()
    [p] = led.pending()
    got = p.contribution
    assert (p.id, p.weight, p.received_version) == (uid, 0.25, 5)
    assert (got.edge_id, got.seq, got.base_version, got.rank, got.alpha, got.samples) == ("edge-4", 7, 2, 3, 5.0, 17)
    assert got.modalities == {"audio": 2, "image": 9} and got.fingerprint == "fp-x"
    for seq in (3, 1, 2, 5):
        led.accept(contrib(1, seq), 0, 1.0, norm=float(seq))
    assert led.accepted_seqs("edge-1", limit=3) == [2, 3, 5] and led.accepted_seqs("edge-3") == []
    assert led.recent_norms(2) == [2.0, 5.0] and led.recent_norms(100) == [3.5, 3.0, 1.0, 2.0, 5.0]
    assert [q.contribution.seq for q in led.pending(limit=2)] == [7, 3]  # arrival order
    assert led.pending_count() == 5


def test_applied_updates_server_state_and_prune(opener: Opener):
    led = opener()
    ids = [led.accept(contrib(i, 1), 0, 1.0) for i in range(3)]
    led.commit_global(GlobalState(1, {"x": np.zeros(2, np.float32)}, "fedavg"), [ids[2], ids[0]],
                      server_state={"m": np.ones(1, np.float32)})
    led.commit_global(GlobalState(2, {"x": np.ones(2, np.float32)}, "fedavg", meta={"n": 1}), [ids[1]])
    assert led.applied_in(1) == [("edge-0", 1), ("edge-2", 1)]  # by arrival, not by the order passed
    assert [u.contribution.edge_id for u in led.applied_updates(2)] == ["edge-1"]
    assert np.array_equal(led.server_state(1)["m"], np.ones(1, np.float32))
    assert led.server_state(2) == {} and led.server_state() == {}
    assert led.load_global(2).meta == {"n": 1} and led.load_global(1).strategy == "fedavg"
    with pytest.raises(KeyError, match=r"^3$"):
        led.load_global(3)
    pend = led.accept(contrib(9, 1), 2, 1.0)
    assert led.prune(keep_globals=1) == 3 + 1  # three applied updates and v1
    assert led.prune(keep_globals=1) == 0
    assert opener().latest_global().tensors["x"][0] == 1.0  # type: ignore[union-attr]
    assert [p.id for p in led.pending()] == [pend]  # a pending update keeps its tensors


def test_pg_tensors_live_in_the_database_not_on_disk(pg_url: str, tmp_path: Path):
    """Replicas on other machines read the same bytes: nothing is written under the state directory."""
    with PgLedger(pg_url) as led:
        c = contrib(1, 1)
        led.accept(c, 0, 1.0)
        led.commit_global(GlobalState(1, {"x": np.arange(3, dtype=np.float32)}, "fedavg"), [])
    assert list(tmp_path.iterdir()) == []
    with psycopg.connect(pg_url) as db:
        blob = db.execute("SELECT tensors FROM updates WHERE edge_id='edge-1'").fetchone()[0]
        stored = st_load(bytes(blob))
        assert stored.keys() == c.tensors.keys()
        assert all(np.array_equal(stored[k], c.tensors[k]) for k in stored)
        g = st_load(bytes(db.execute("SELECT tensors FROM globals WHERE version=1").fetchone()[0]))
        assert np.array_equal(g["x"], np.arange(3, dtype=np.float32))


CRASHER = textwrap.dedent(
    """
    import os, sys
    from contextlib import contextmanager
    sys.path[:0] = [{repo!r}]
    from tests.support.cloud_testkit import make_contribution
    from cloud_aggregator.ledger_pg import PgLedger
    from cloud_aggregator.strategies import get_strategy

    class Dying(PgLedger):
        armed = False
        @contextmanager
        def _write(self):
            with super()._write() as db:
                yield db
                if self.armed:
                    os._exit(9)  # the transaction's statements ran; COMMIT never sent

    led = Dying({url!r})
    ids = [led.accept(make_contribution(i, 2, {{"q": (6, 5)}}, seq=1), 0, 1.0) for i in range(3)]
    g = get_strategy("fedavg").aggregate(None, [p.contribution for p in led.pending()[:2]])
    led.commit_global(g, ids[:2])
    led.accept(make_contribution(7, 2, {{"q": (6, 5)}}, seq=1), 1, 1.0)
    g2 = get_strategy("fedavg").aggregate(g, [p.contribution for p in led.pending()])
    led.armed = True
    led.commit_global(g2, [p.id for p in led.pending()])
    """
)


def test_real_process_crash_mid_commit(pg_url: str):
    code = CRASHER.format(repo=str(Path(__file__).resolve().parents[2]), url=pg_url)
    rc = subprocess.run([sys.executable, "-c", code], timeout=120).returncode
    assert rc == 9
    with PgLedger(pg_url) as led:
        assert led.latest_version() == 1  # v2's transaction died with the process
        pend = led.pending()
        assert sorted(p.contribution.edge_id for p in pend) == ["edge-2", "edge-7"]
        g1 = led.latest_global()
        g2 = get_strategy("fedavg").aggregate(g1, [p.contribution for p in pend])
        assert g2.version == 2
        led.commit_global(g2, [p.id for p in pend])
        assert led.pending_count() == 0 and led.latest_version() == 2
        with pytest.raises(VersionConflict):
            led.commit_global(GlobalState(3, g2.tensors), [p.id for p in pend])


def _bump(url: str) -> int:
    """What a replica taking over does (``leader.Lease``): the next epoch."""
    with psycopg.connect(url, autocommit=True) as db:
        return int(db.execute("UPDATE lease SET epoch = epoch + 1 WHERE name='cloud' RETURNING epoch").fetchone()[0])


def test_a_deposed_replica_can_never_write(pg_url: str):
    PgLedger(pg_url).close()  # schema and lease row
    old = PgLedger(pg_url, epoch=_bump(pg_url))
    uid = old.accept(contrib(1, 1), 0, 1.0)
    old.check_lease()
    old.commit_global(GlobalState(0, {"x": np.zeros(2, np.float32)}, "fedavg"), [])
    new_epoch = _bump(pg_url)  # another replica took the lease
    with pytest.raises(LeaseLost, match="this replica holds"):
        old.accept(contrib(2, 1), 0, 1.0)
    with pytest.raises(LeaseLost):
        old.commit_global(GlobalState(1, {"x": np.ones(2, np.float32)}, "fedavg"), [uid])
    with pytest.raises(LeaseLost):
        old.write_doc("outseq.json", b'{"reserved": 1}')
    with pytest.raises(LeaseLost):
        old.prune(0)
    with pytest.raises(LeaseLost):
        old.check_lease()  # what the service asks before it announces anything
    new = PgLedger(pg_url, epoch=new_epoch)
    assert new.latest_version() == 0 and new.pending_count() == 1 and not new.seen("edge-2", 1)
    assert new.read_doc("outseq.json") is None and new.load_global(0).tensors["x"].shape == (2,)
    new.commit_global(GlobalState(1, {"x": np.ones(2, np.float32)}, "fedavg"), [uid])  # the leader writes
    assert new.applied_in(1) == [("edge-1", 1)]
    old.close()
    new.close()


def test_a_takeover_waits_for_the_old_leaders_write_in_flight(pg_url: str):
    """The epoch bump blocks on the row the old leader's open write holds FOR SHARE: that write commits first
    (and the new leader reads it); every later write of the old leader fails."""
    PgLedger(pg_url).close()
    old = PgLedger(pg_url, epoch=_bump(pg_url))
    bumped: list[int] = []
    with old._write() as db:  # a write in flight: the fence check passed, COMMIT not yet sent
        db.execute("INSERT INTO docs (name, body) VALUES ('in-flight', 'x')")
        t = threading.Thread(target=lambda: bumped.append(_bump(pg_url)))
        t.start()
        time.sleep(1.0)
        assert bumped == [], "the takeover must wait for the write in flight"
    t.join(30)
    assert bumped == [2]
    with PgLedger(pg_url) as reader:
        assert reader.read_doc("in-flight") == b"x"
    with pytest.raises(LeaseLost):
        old.write_doc("after", b"y")
    old.close()


def test_a_dead_connection_is_lease_lost_not_a_crash(pg_url: str):
    led = PgLedger(pg_url, epoch=None)
    pid = led._db.info.backend_pid
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    with pytest.raises(LeaseLost):
        led.accept(contrib(1, 1), 0, 1.0)
    with pytest.raises(LeaseLost):
        led.pending_count()
    led.close()


def test_sites_and_seq_reservations_follow_the_ledger(pg_url: str, tmp_path: Path):
    """A replica taking over (its own, empty state directory) continues the seqs and knows every site."""
    from broker.wire import AdapterUpdate

    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir()
    b_dir.mkdir()
    with PgLedger(pg_url) as led:
        seqs = SeqReserve(a_dir, block=5, store=led.docs)
        used = [seqs.take() for _ in range(7)]  # crosses a block boundary
        book = SiteBook(a_dir, store=led.docs)
        book.accepted("s1", AdapterUpdate(site="s1", edge="e1", seq=4, base_version=0, base_model="f", rank=2,
                                          alpha=4.0, samples=3, modalities={"audio": 3}, tensors={}))
    assert list(a_dir.iterdir()) == []  # nothing on the replica's disk
    with PgLedger(pg_url) as led:
        nxt = SeqReserve(b_dir, block=5, store=led.docs).take()
        assert nxt > max(used)
        prof = SiteBook(b_dir, store=led.docs).get("s1")
        assert prof is not None and (prof.edge, prof.rank, prof.last_seq) == ("e1", 2, 4)
    # and the embedded default is unchanged: files in the state directory
    SeqReserve(tmp_path, block=5).take()
    assert (tmp_path / "outseq.json").exists()
    assert isinstance(open_ledger("", tmp_path / "s"), Ledger)


def test_no_state_on_disk_leaks_between_backends(pg_url: str, tmp_path: Path):
    """The PostgreSQL ledger never creates the sqlite files (a replica's state_dir holds only its reference)."""
    led = open_ledger(pg_url, tmp_path)
    led.accept(contrib(1, 1), 0, 1.0)
    led.close()
    assert not (tmp_path / "ledger.sqlite").exists() and not os.listdir(tmp_path)
