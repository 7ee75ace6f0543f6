"""The cloud service never imports torch: its maths is numpy, its files ``safetensors.numpy``.

Only the one-off version-0 builder (a child process, ``cloud_aggregator.bootstrap``) and the peft export
import torch. The service test runs ``python -m cloud_aggregator --config FILE`` (what systemd runs) under
a hook that writes its ``sys.modules`` at exit, feeds it real uploads until it has aggregated a version,
and then stops it: torch must not be among the modules it ever imported.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
from safetensors.numpy import load_file

from broker import topics
from broker.address import BrokerAddress
from broker.wire import GlobalAdapter
from broker.wire.bodies import decode_body
from cloud_aggregator.config import write_cloud_config
from megace_model.fingerprint import base_fingerprint
from tests.support.cloud_bus import MAX_RANK, MODALITIES, cloud_config, model_config, perturbed, update_payload
from tests.support.collector import Collector

#: the service run under a hook that dumps its sys.modules when it exits
DUMP_MODULES = (
    "import atexit, json, runpy, sys\n"
    "out, sys.argv = sys.argv[1], ['cloud_aggregator', '--config', sys.argv[2]]\n"
    "atexit.register(lambda: open(out, 'w').write(json.dumps(sorted(sys.modules))))\n"
    "runpy.run_module('cloud_aggregator', run_name='__main__')\n"
)
SITES = ("s0", "s1")


def _torch_modules(modules: list[str]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in {"torch", "peft", "transformers"})


def _wait(done: Callable[[], bool], proc: subprocess.Popen[bytes], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert proc.poll() is None, f"the service exited early ({proc.returncode})"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.1)


def _versions(col: Collector) -> list[int]:
    return [b.version for _, e in col.envelopes if isinstance(b := decode_body(e), GlobalAdapter)]


def test_importing_the_service_and_every_strategy_does_not_import_torch() -> None:
    code = ("import sys, cloud_aggregator.cli, cloud_aggregator.service, cloud_aggregator.core, "
            "cloud_aggregator.strategies, cloud_aggregator.export, cloud_aggregator.bootstrap; "
            "sys.exit(','.join(m for m in sys.modules if m.split('.')[0] == 'torch') or None)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_running_service_aggregates_without_ever_importing_torch(tmp_path: Path, fresh_mosquitto) -> None:  # type: ignore[no-untyped-def]
    # a broker of its own: a real cloud leaves retained globals of its base behind
    addr = BrokerAddress(fresh_mosquitto.host, fresh_mosquitto.port)
    state = tmp_path / "state"
    cfg = cloud_config(state, addr, cloud_id="cloud-numpy", aggregation={"buffer_k": len(SITES)})
    cfg_path = write_cloud_config(cfg, tmp_path / "cloud.toml")
    dump = tmp_path / "modules.json"
    fingerprint = base_fingerprint(model_config())
    with open(tmp_path / "cloud.log", "wb") as log, Collector(addr, *topics.subscriptions(topics.global_down())) as col:
        proc = subprocess.Popen([sys.executable, "-c", DUMP_MODULES, str(dump), str(cfg_path)], stderr=log)
        try:
            # the global is announced once the service has subscribed to the uploads: none is lost
            _wait(lambda: 0 in _versions(col), proc, "version 0 on the bus")
            v0 = load_file(str(state / "globals" / "v00000000.safetensors"))
            pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="torch-free-edges")
            pub.connect(addr.host, addr.port)
            pub.loop_start()
            try:
                for site in SITES:
                    update = perturbed(v0, seed=zlib.crc32(site.encode()), scale=0.002)
                    payload = update_payload(update, site=site, seq=1, base_version=0, fingerprint=fingerprint,
                                             rank=MAX_RANK, alpha=MAX_RANK, modalities={m: 16 for m in MODALITIES})
                    pub.publish(topics.adapter_up(site), payload, qos=1).wait_for_publish(10)
                _wait(lambda: 1 in _versions(col), proc, "version 1 on the bus")  # validated, aggregated, broadcast
            finally:
                pub.loop_stop()
                pub.disconnect()
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(60)
    assert code == 0, (tmp_path / "cloud.log").read_text()[-3000:]
    modules = json.loads(dump.read_text())
    assert "cloud_aggregator.core" in modules and "cloud_aggregator.strategies.fedavg" in modules
    assert "numpy.linalg" in modules and "safetensors.numpy" in modules
    assert not _torch_modules(modules), f"the service imported {_torch_modules(modules)[:5]}"
