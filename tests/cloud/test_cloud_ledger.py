"""The ledger survives crashes: nothing accepted is lost, nothing is applied twice, versions resume."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from cloud_aggregator.contribution import GlobalState
from cloud_aggregator.errors import DuplicateUpdate
from cloud_aggregator.ledger import Ledger, VersionConflict, save_tensors
from cloud_aggregator.strategies import get_strategy
from tests.support.cloud_testkit import make_contribution

MODS = {"q": (6, 5)}


def contrib(edge: int, seq: int, **kw):
    return make_contribution(edge, 2, MODS, seq=seq, modalities={"audio": 3}, **kw)


def test_accept_dedup_and_reopen(tmp_path: Path):
    led = Ledger(tmp_path)
    c = contrib(1, 1)
    uid = led.accept(c, received_version=0, weight=0.5, norm=1.0)
    assert led.seen("edge-1", 1) and not led.seen("edge-1", 2) and not led.seen("edge-2", 1)
    assert led.last_seq("edge-1") == 1 and led.last_seq("edge-9") is None
    with pytest.raises(DuplicateUpdate, match=r"^duplicate: edge-1#1$"):
        led.accept(contrib(1, 1, seed=99), received_version=0, weight=1.0)
    led.reject("edge-3", 4, "norm_outlier", "too big")
    # "crash": drop the handle without closing, open a second one
    del led
    led2 = Ledger(tmp_path)
    assert led2.seen("edge-1", 1)
    [p] = led2.pending()
    assert p.id == uid and p.weight == 0.5 and p.received_version == 0
    assert p.contribution.modalities == {"audio": 3} and p.contribution.alpha == c.alpha
    for name, t in c.tensors.items():
        assert np.array_equal(p.contribution.tensors[name], t)  # the winning copy, not the duplicate
    assert led2.rejections() == [("edge-3", 4, "norm_outlier")]
    assert len(list((tmp_path / "updates").iterdir())) == 1  # the refused duplicate left no file
    led2.close()


def test_commit_marks_applied_once_and_resumes_version(tmp_path: Path):
    s = get_strategy("fedavg")
    with Ledger(tmp_path) as led:
        assert led.latest_global() is None and led.latest_version() is None
        ids = [led.accept(contrib(i, 1), 0, 1.0) for i in range(3)]
        pend = led.pending()
        g = s.aggregate(None, [p.contribution for p in pend[:2]])
        led.commit_global(g, ids[:2], server_state={"m/q": np.ones(2, np.float32)})
        assert led.pending_count() == 1
        with pytest.raises(VersionConflict, match=r"^1 of the updates are not pending$"):  # the same updates again
            led.commit_global(GlobalState(2, g.tensors, "fedavg"), ids[:1])
        with pytest.raises(VersionConflict, match=r"^version 5 after 1$"):  # skipping a version
            led.commit_global(GlobalState(5, g.tensors, "fedavg"), ids[2:])
        assert led.latest_version() == 1 and led.pending_count() == 1  # failed commits changed nothing
    with Ledger(tmp_path) as led:
        back = led.latest_global()
        assert back is not None and back.version == 1 and back.strategy == "fedavg"
        for name, t in g.tensors.items():
            assert np.array_equal(back.tensors[name], t)
        assert np.array_equal(led.server_state()["m/q"], np.ones(2, np.float32))
        assert [p.id for p in led.pending()] == [ids[2]]


CRASHER = textwrap.dedent(
    """
    import os, sys
    sys.path[:0] = [{repo!r}]
    from tests.support.cloud_testkit import make_contribution
    from cloud_aggregator.ledger import Ledger, save_tensors
    from cloud_aggregator.strategies import get_strategy
    led = Ledger({root!r})
    ids = [led.accept(make_contribution(i, 2, {{"q": (6, 5)}}, seq=1), 0, 1.0) for i in range(3)]
    g = get_strategy("fedavg").aggregate(None, [p.contribution for p in led.pending()[:2]])
    led.commit_global(g, ids[:2])
    led.accept(make_contribution(7, 2, {{"q": (6, 5)}}, seq=1), 1, 1.0)
    # die half-way through publishing v2: file written, transaction never run
    save_tensors(led.root / "globals" / "v00000002.safetensors", g.tensors)
    (led.root / "updates" / "half.safetensors.tmp").write_bytes(b"partial")
    os._exit(9)
    """
)


def test_real_process_crash_mid_commit(tmp_path: Path):
    code = CRASHER.format(repo=str(Path(__file__).resolve().parents[2]), root=str(tmp_path))
    rc = subprocess.run([sys.executable, "-c", code], timeout=120).returncode
    assert rc == 9
    with Ledger(tmp_path) as led:
        assert led.latest_version() == 1  # v2 never committed
        assert not (tmp_path / "globals" / "v00000002.safetensors").exists()  # orphan removed
        assert not (tmp_path / "updates" / "half.safetensors.tmp").exists()
        pend = led.pending()
        assert sorted(p.contribution.edge_id for p in pend) == ["edge-2", "edge-7"]
        # resume: aggregate the survivors as v2, exactly once
        g1 = led.latest_global()
        g2 = get_strategy("fedavg").aggregate(g1, [p.contribution for p in pend])
        assert g2.version == 2
        led.commit_global(g2, [p.id for p in pend])
        assert led.pending_count() == 0 and led.latest_version() == 2
        with pytest.raises(VersionConflict):
            led.commit_global(GlobalState(3, g2.tensors), [p.id for p in pend])


def test_prune_keeps_recent_globals_and_pending(tmp_path: Path):
    with Ledger(tmp_path) as led:
        for v in range(1, 5):
            uid = led.accept(contrib(v, 1), v - 1, 1.0)
            led.commit_global(GlobalState(v, {"x": np.full((2,), float(v), np.float32)}), [uid])
        pending_id = led.accept(contrib(9, 1), 4, 1.0)
        assert led.prune(keep_globals=2) == 4 + 2
        assert led.latest_global().tensors["x"][0] == 4.0  # type: ignore[union-attr]
        assert [p.id for p in led.pending()] == [pending_id]
        assert len(list((tmp_path / "globals").iterdir())) == 2


def test_atomic_write_leaves_no_tmp(tmp_path: Path):
    save_tensors(tmp_path / "a.safetensors", {"x": np.arange(4.0, dtype=np.float32)[1:]})  # a view is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def test_every_field_of_an_accepted_update_survives_a_reopen(tmp_path: Path):
    c = make_contribution(4, 3, MODS, seq=7, base_version=2, alpha=5.0, samples=17,
                          modalities={"audio": 2, "image": 9}, fingerprint="fp-x")
    with Ledger(tmp_path) as led:
        uid = led.accept(c, received_version=5, weight=0.25, norm=3.5)
    with Ledger(tmp_path) as led:
        [p] = led.pending()
        got = p.contribution
        assert (p.id, p.weight, p.received_version) == (uid, 0.25, 5)
        assert (got.edge_id, got.seq, got.base_version, got.rank, got.alpha, got.samples) == ("edge-4", 7, 2, 3, 5.0,
                                                                                               17)
        assert got.modalities == {"audio": 2, "image": 9} and got.fingerprint == "fp-x"
        assert got.tensors.keys() == c.tensors.keys()
        assert led.recent_norms(10) == [3.5]
        [f] = (tmp_path / "updates").iterdir()
        with safe_open(f, "np") as st:  # each file names what it holds, for an operator reading the directory
            assert st.metadata() == {"edge_id": "edge-4", "seq": "7"}


def test_queries_an_edge_and_the_metrics_rely_on(tmp_path: Path):
    with Ledger(tmp_path) as led:
        for seq in (3, 1, 2, 5):
            led.accept(contrib(1, seq), 0, 1.0, norm=float(seq))
        led.accept(contrib(2, 9), 0, 1.0)  # no norm recorded
        assert led.accepted_seqs("edge-1", limit=3) == [2, 3, 5]  # the latest three, ascending
        assert led.accepted_seqs("edge-1") == [1, 2, 3, 5] and led.accepted_seqs("edge-3") == []
        for seq in range(10, 45):
            led.accept(contrib(3, seq), 0, 1.0)
        assert led.accepted_seqs("edge-3") == list(range(13, 45))  # the default acknowledgement window: 32
        assert led.recent_norms(2) == [2.0, 5.0]  # the last two accepted, oldest first, NULLs skipped
        assert led.recent_norms(100) == [3.0, 1.0, 2.0, 5.0]
        assert led.last_seq("edge-1") == 5
        assert [p.contribution.seq for p in led.pending(limit=2)] == [3, 1]  # arrival order
        assert led.pending_count() == 5 + 35
        led.reject("edge-1", 2, "duplicate")
        led.reject("edge-8", None, "bad_payload", "x" * 10)
        led.reject("edge-1", 9, "duplicate")
        assert led.counts() == (5 + 35, {"duplicate": 2, "bad_payload": 1})
        assert led.rejections() == [("edge-1", 2, "duplicate"), ("edge-8", None, "bad_payload"),
                                    ("edge-1", 9, "duplicate")]


def test_rejections_keep_their_audit_fields(tmp_path: Path):
    with Ledger(tmp_path) as led:
        led.reject("edge-5", 4, "stale", "staleness 9 > max 2", base_version=1, received_version=10)
        led.reject("edge-6", None, "bad_payload")
    with sqlite3.connect(tmp_path / "ledger.sqlite") as db:  # the audit record as an operator reads it
        rows = db.execute("SELECT edge_id, seq, base_version, received_version, reason, detail FROM rejections")
        assert list(rows) == [("edge-5", 4, 1, 10, "stale", "staleness 9 > max 2"),
                              ("edge-6", None, None, None, "bad_payload", "")]


def test_applied_updates_and_server_state_per_version(tmp_path: Path):
    with Ledger(tmp_path) as led:
        ids = [led.accept(contrib(i, 1), 0, 1.0) for i in range(3)]
        led.commit_global(GlobalState(1, {"x": np.zeros(2, np.float32)}, "fedavg"), [ids[2], ids[0]],
                          server_state={"m": np.ones(1, np.float32)})
        led.commit_global(GlobalState(2, {"x": np.ones(2, np.float32)}, "fedavg", meta={"n": 1}), [ids[1]])
        assert led.applied_in(1) == [("edge-0", 1), ("edge-2", 1)]  # by arrival, not by the order passed
        assert [u.contribution.edge_id for u in led.applied_updates(2)] == ["edge-1"]
        assert np.array_equal(led.server_state(1)["m"], np.ones(1, np.float32))
        assert led.server_state(2) == {} and led.server_state() == {}  # v2 saved none
        assert led.load_global(2).meta == {"n": 1} and led.load_global(1).strategy == "fedavg"
        with safe_open(tmp_path / "globals" / "v00000001.safetensors", "np") as st:
            assert st.metadata() == {"strategy": "fedavg"}
    with sqlite3.connect(tmp_path / "ledger.sqlite") as db:
        assert list(db.execute("SELECT version, n_updates FROM globals ORDER BY version")) == [(1, 2), (2, 1)]
    with Ledger(tmp_path) as led, pytest.raises(KeyError, match=r"^3$"):
        led.load_global(3)
    with Ledger(tmp_path / "empty") as led:
        assert led.server_state() == {}


def test_prune_removes_exactly_the_files_no_longer_needed(tmp_path: Path):
    with Ledger(tmp_path) as led:
        for v in range(1, 4):
            uid = led.accept(contrib(v, 1), v - 1, 1.0)
            led.commit_global(GlobalState(v, {"x": np.full((2,), float(v), np.float32)}), [uid],
                              server_state={"m": np.full((1,), float(v), np.float32)})
        assert led.prune(keep_globals=3) == 3  # three applied updates, no global
        assert len(list((tmp_path / "updates").iterdir())) == 0
        assert led.prune(keep_globals=3) == 0  # nothing left to remove
        assert led.prune(keep_globals=1) == 2
        assert sorted(p.name for p in (tmp_path / "globals").iterdir()) == ["v00000003.opt.safetensors",
                                                                            "v00000003.safetensors"]
        assert np.array_equal(led.server_state()["m"], np.full((1,), 3.0, np.float32))
    with Ledger(tmp_path) as led:  # reopening keeps what prune kept (nothing treated as an orphan)
        assert led.latest_global().tensors["x"][0] == 3.0  # type: ignore[union-attr]


def test_the_database_is_durable_by_configuration(tmp_path: Path):
    with Ledger(tmp_path), sqlite3.connect(tmp_path / "ledger.sqlite") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persistent across connections


def test_prune_after_a_crash_that_already_removed_some_files(tmp_path: Path):
    """A crash between deleting a file and clearing its row leaves rows whose file is gone: prune finishes the job."""
    with Ledger(tmp_path) as led:
        for v in (1, 2):
            uid = led.accept(contrib(v, 1), v - 1, 1.0)
            led.commit_global(GlobalState(v, {"x": np.zeros(2, np.float32)}), [uid],
                              server_state={"m": np.ones(1, np.float32)})
        for f in [*(tmp_path / "updates").iterdir(), tmp_path / "globals" / "v00000001.safetensors"]:
            f.unlink()
        assert led.prune(keep_globals=1) == 3  # two updates and v1, whose files were partly gone already
        assert sorted(p.name for p in (tmp_path / "globals").iterdir()) == ["v00000002.opt.safetensors",
                                                                            "v00000002.safetensors"]
