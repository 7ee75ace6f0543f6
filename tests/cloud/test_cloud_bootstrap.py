"""Version 0 is built in a child process: the service never imports peft/transformers nor holds the base.

The service tests run ``python -m cloud_aggregator --config FILE`` (what systemd runs) on a fresh
state directory. The child's failures are planted with a ``sitecustomize`` on the path that acts
only in the builder (``python -m cloud_aggregator.bootstrap``): a fresh interpreter runs it at start.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from broker.address import BrokerAddress
from cloud_aggregator import bootstrap
from cloud_aggregator.bootstrap import INITIAL_FILE, REFERENCE_FILE, BootstrapError
from cloud_aggregator.config import write_cloud_config
from cloud_aggregator.core import AggregatorCore
from cloud_aggregator.reference import open_reference
from tests.support.cloud_bus import cloud_config, model_config

#: the service run under a hook that dumps its sys.modules when it exits
DUMP_MODULES = (
    "import atexit, json, runpy, sys\n"
    "out, sys.argv = sys.argv[1], ['cloud_aggregator', '--config', sys.argv[2]]\n"
    "atexit.register(lambda: open(out, 'w').write(json.dumps(sorted(sys.modules))))\n"
    "runpy.run_module('cloud_aggregator', run_name='__main__')\n"
)


def _in_builder_only(tmp_path: Path, body: str) -> Path:
    """A folder with a ``sitecustomize`` running ``body`` in the builder child alone."""
    folder = tmp_path / "hook"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(
        "import sys\nif 'cloud_aggregator.bootstrap' in sys.orig_argv:\n"
        + "".join(f"    {line}\n" for line in body.splitlines())
    )
    return folder


def _wait_file(path: Path, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the service exited early ({proc.returncode})"
        assert time.monotonic() < deadline, f"no {path.name} after {timeout} s"
        time.sleep(0.1)


def test_service_on_fresh_state_never_imports_peft_or_transformers(tmp_path: Path, fresh_mosquitto) -> None:  # type: ignore[no-untyped-def]
    # a broker of its own: the service leaves a retained version 0 of its base, which edges of other
    # tests on the shared broker would receive (and rightly refuse as another base)
    addr = BrokerAddress(fresh_mosquitto.host, fresh_mosquitto.port)
    cfg = cloud_config(tmp_path / "state", addr, cloud_id="cloud-boot")
    cfg_path = write_cloud_config(cfg, tmp_path / "cloud.toml")
    dump = tmp_path / "modules.json"
    with open(tmp_path / "cloud.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", DUMP_MODULES, str(dump), str(cfg_path)], stderr=log)
        try:
            _wait_file(Path(cfg.state_dir) / "globals" / "v00000000.safetensors", proc)
            time.sleep(0.5)
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(60)
    assert code == 0, (tmp_path / "cloud.log").read_text()[-3000:]
    modules = set(json.loads(dump.read_text()))
    assert "cloud_aggregator.core" in modules  # the hook saw the service itself
    heavy = sorted(m for m in modules if m.split(".")[0] in {"peft", "transformers", "tokenizers"})
    assert not heavy, f"the service imported {heavy[:5]}"
    assert (Path(cfg.state_dir) / REFERENCE_FILE).exists() and (Path(cfg.state_dir) / INITIAL_FILE).exists()


def test_version0_from_the_child_equals_the_in_process_build(tmp_path: Path) -> None:
    model = model_config()
    ref, initial = open_reference(tmp_path / "child", model, need_initial=True, isolate=True)
    inline_ref, inline = open_reference(tmp_path / "inline", model, need_initial=True, isolate=False)
    built = bootstrap.build(model)[0]
    assert initial is not None and inline is not None
    assert initial.keys() == built.keys() == inline.keys()
    for name, t in built.items():
        assert initial[name].dtype == np.float32 and t.dtype == torch.float32
        assert np.array_equal(initial[name], t.numpy()), name
        assert np.array_equal(inline[name], t.numpy()), name
    assert ref == inline_ref
    child_doc = json.loads((tmp_path / "child" / REFERENCE_FILE).read_text())
    assert child_doc == json.loads((tmp_path / "inline" / REFERENCE_FILE).read_text())


@pytest.mark.parametrize(("hook", "says"), [
    ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", "exit code -9"),
    ("sys.modules['peft'] = None", "ModuleNotFoundError"),
])
def test_a_failing_builder_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hook: str,
                                            says: str) -> None:
    monkeypatch.syspath_prepend(str(_in_builder_only(tmp_path, hook)))
    state = tmp_path / "state"
    state.mkdir()
    start = time.monotonic()
    with pytest.raises(BootstrapError, match="builder") as info:
        open_reference(state, model_config(), need_initial=True, isolate=True)
    assert says in str(info.value)
    assert time.monotonic() - start < 60
    assert not (state / REFERENCE_FILE).exists()


def test_a_hung_builder_is_killed_after_the_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(_in_builder_only(tmp_path, "import time\ntime.sleep(600)")))
    start = time.monotonic()
    with pytest.raises(BootstrapError, match="ran past 3 s"):
        bootstrap.run_bootstrap(tmp_path, model_config(), isolate=True, timeout_s=3)
    assert time.monotonic() - start < 30


def test_the_service_exits_with_the_builders_error(tmp_path: Path, mosquitto_addr: BrokerAddress) -> None:
    hook = _in_builder_only(tmp_path, "raise SystemExit('planted builder failure')")
    cfg_path = write_cloud_config(cloud_config(tmp_path / "state", mosquitto_addr), tmp_path / "cloud.toml")
    env = {"PYTHONPATH": f"{hook}:{Path.cwd()}", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "cloud_aggregator", "--config", str(cfg_path)], env=env,
                          capture_output=True, timeout=120)
    assert done.returncode == 1
    err = done.stderr.decode()
    assert "planted builder failure" in err and "BootstrapError" in err


def test_restarts_skip_the_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = cloud_config(tmp_path, BrokerAddress("127.0.0.1", 1))
    AggregatorCore(cfg).close()  # fresh: builds version 0 and commits it
    calls: list[Path] = []
    monkeypatch.setattr("cloud_aggregator.reference.run_bootstrap", lambda d, *a, **k: calls.append(d))
    core = AggregatorCore(cfg)
    assert core.version == 0
    core.close()
    # an empty ledger with the builder's files in place (a crash before v0 was committed) reads them
    ref, initial = open_reference(tmp_path, cfg.model, need_initial=True)
    assert initial is not None and ref.schema.modules
    assert calls == []
