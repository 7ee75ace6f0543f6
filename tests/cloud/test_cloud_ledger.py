"""The ledger survives crashes: nothing accepted is lost, nothing is applied twice, versions resume."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from cloud_testkit import make_contribution

from cloud_aggregator.contribution import GlobalAdapter
from cloud_aggregator.errors import DuplicateUpdate
from cloud_aggregator.ledger import Ledger, VersionConflict, save_tensors
from cloud_aggregator.strategies import get_strategy

MODS = {"q": (6, 5)}


def contrib(edge: int, seq: int, **kw):
    return make_contribution(edge, 2, MODS, seq=seq, modalities={"audio": 3}, **kw)


def test_accept_dedup_and_reopen(tmp_path: Path):
    led = Ledger(tmp_path)
    c = contrib(1, 1)
    uid = led.accept(c, received_version=0, weight=0.5, norm=1.0)
    assert led.seen("edge-1", 1) and not led.seen("edge-1", 2) and not led.seen("edge-2", 1)
    assert led.last_seq("edge-1") == 1 and led.last_seq("edge-9") is None
    with pytest.raises(DuplicateUpdate):
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
        assert torch.equal(p.contribution.tensors[name], t)  # the winning copy, not the duplicate
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
        led.commit_global(g, ids[:2], server_state={"m/q": torch.ones(2)})
        assert led.pending_count() == 1
        with pytest.raises(VersionConflict):  # the same updates again
            led.commit_global(GlobalAdapter(2, g.tensors, "fedavg"), ids[:1])
        with pytest.raises(VersionConflict):  # skipping a version
            led.commit_global(GlobalAdapter(5, g.tensors, "fedavg"), ids[2:])
        assert led.latest_version() == 1 and led.pending_count() == 1  # failed commits changed nothing
    with Ledger(tmp_path) as led:
        back = led.latest_global()
        assert back is not None and back.version == 1 and back.strategy == "fedavg"
        for name, t in g.tensors.items():
            assert torch.equal(back.tensors[name], t)
        assert torch.equal(led.server_state()["m/q"], torch.ones(2))
        assert [p.id for p in led.pending()] == [ids[2]]


CRASHER = textwrap.dedent(
    """
    import os, sys
    sys.path[:0] = [{tests!r}, {repo!r}]
    from cloud_testkit import make_contribution
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
    here = Path(__file__).parent
    code = CRASHER.format(tests=str(here), repo=str(here.parent.parent), root=str(tmp_path))
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
            led.commit_global(GlobalAdapter(3, g2.tensors), [p.id for p in pend])


def test_prune_keeps_recent_globals_and_pending(tmp_path: Path):
    with Ledger(tmp_path) as led:
        for v in range(1, 5):
            uid = led.accept(contrib(v, 1), v - 1, 1.0)
            led.commit_global(GlobalAdapter(v, {"x": torch.full((2,), float(v))}), [uid])
        pending_id = led.accept(contrib(9, 1), 4, 1.0)
        assert led.prune(keep_globals=2) == 4 + 2
        assert led.latest_global().tensors["x"][0] == 4.0  # type: ignore[union-attr]
        assert [p.id for p in led.pending()] == [pending_id]
        assert len(list((tmp_path / "globals").iterdir())) == 2


def test_atomic_write_leaves_no_tmp(tmp_path: Path):
    save_tensors(tmp_path / "a.safetensors", {"x": torch.arange(4.0)[1:]})  # a view is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]
