"""Version 0 and ``reference.json``, built once in a short-lived child process.

Why a child: building version 0 needs transformers + peft and the whole frozen base (MiniLM:
~150 MiB of imports and ~90 MiB of weights) to produce a few hundred kilobytes: the seeded shared
adapter, the adapter schema, ||W0|| and the A row scales. A service that built them itself would
keep most of that memory for its whole life (neither CPython's imports nor glibc's heap give it
back). The child is a fresh interpreter (``python -m cloud_aggregator.bootstrap``: what the
``spawn`` start method does, without multiprocessing's re-import of the parent's ``__main__``,
which breaks any script that builds a core without an ``if __name__ == "__main__"`` guard); it
writes ``initial.safetensors`` and then ``reference.json`` into the state directory (each
atomically) and exits; the service only reads the two files (``reference.open_reference``).

A child that fails is reported with its exit code and the end of its stderr (its traceback);
one that runs past ``BUILD_TIMEOUT_S`` is killed. Each is a :class:`BootstrapError` at start,
never a hang.

torch is imported inside the functions that build, never at module level: the service imports this
module (for the file names and :func:`run_bootstrap`) and must stay torch-free.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from megace_common.durable import atomic_write
from megace_common.lora import add_peft_prefix, is_lora_b, lora_scaling, rescale_b, split_lora
from megace_model.config import EdgeModelConfig
from megace_model.fingerprint import base_fingerprint

from .validation import AdapterSchema

if TYPE_CHECKING:
    import torch

REFERENCE_FILE = "reference.json"
#: version 0 (the seeded shared adapter at the global's scaling 1), float32, with the fingerprint as metadata
INITIAL_FILE = "initial.safetensors"
#: MiniLM builds in ~6 s on a 2-core box; a child still running after this is stuck
BUILD_TIMEOUT_S = 600.0


class BootstrapError(RuntimeError):
    """The version-0 builder failed, died or hung: the service cannot start on an empty state dir."""


def build(model: EdgeModelConfig) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, ...]], float]:
    """One model build: version 0, the personal tensors' shapes, and ||W0|| over the adapted modules."""
    import torch

    from megace_model.adapters import build_edge_model, personal_state, shared_state  # lazy: pulls peft

    peft = build_edge_model(model)
    edge = lora_scaling(model.lora_alpha, model.lora_r)
    tensors = {name: rescale_b(t, edge, 1.0) if is_lora_b(name) else t
               for name, t in shared_state(peft, dtype=torch.float32).items()}
    # personal tensors as a share_personal edge uploads them: accepting them lets the no-personalization
    # baselines (FedIT, full-model FedAvg) run through the same cloud; strategies plain-average them
    personal = {add_peft_prefix(n): tuple(t.shape) for n, t in personal_state(peft).items()}
    subs = dict(peft.named_modules())
    total = 0.0
    for m in {p[0] for n in tensors if (p := split_lora(n)) is not None}:
        base = getattr(subs.get(m), "base_layer", None)
        weight = getattr(base, "weight", None)
        if isinstance(weight, torch.Tensor):
            total += float(weight.detach().double().pow(2).sum())
    return tensors, personal, math.sqrt(total)


def a_row_scales(tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per module, ||A||_F / sqrt(r): the RMS norm of one rank component of A."""
    out = {}
    for name, t in tensors.items():
        p = split_lora(name)
        if p is not None and p[1] == "A" and t.dim() == 2 and t.shape[0] > 0:
            out[p[0]] = float(t.double().norm()) / math.sqrt(t.shape[0])
    return out


def write_bootstrap(state_dir: Path, model: EdgeModelConfig) -> None:
    """Build once and write ``initial.safetensors``, then ``reference.json`` (its presence vouches for both)."""
    from safetensors.torch import save

    fingerprint = base_fingerprint(model)
    tensors, personal, base_norm = build(model)
    schema = AdapterSchema.from_adapter(tensors)
    schema = AdapterSchema(schema.modules, {**schema.extras, **personal})
    state_dir.mkdir(parents=True, exist_ok=True)
    own = {k: v.detach().contiguous().clone() for k, v in tensors.items()}  # shared storage is refused
    atomic_write(state_dir / INITIAL_FILE, save(own, metadata={"fingerprint": fingerprint}))
    doc = {
        "fingerprint": fingerprint,
        "model": model.to_dict(),
        "modules": {m: list(s) for m, s in sorted(schema.modules.items())},
        "extras": {n: list(s) for n, s in sorted(schema.extras.items())},
        "base_norm": base_norm,
        "a_rms": dict(sorted(a_row_scales(tensors).items())),
    }
    atomic_write(state_dir / REFERENCE_FILE, json.dumps(doc, indent=1, sort_keys=True).encode())


def isolate_by_default() -> bool:
    """Build in a child unless this process already holds peft (tests, in-process loops): then it saves nothing."""
    return "peft" not in sys.modules


def run_bootstrap(state_dir: Path, model: EdgeModelConfig, *, isolate: bool | None = None,
                  timeout_s: float = BUILD_TIMEOUT_S) -> None:
    """Write version 0 and the reference into ``state_dir``, in a child interpreter when ``isolate``."""
    if not (isolate_by_default() if isolate is None else isolate):
        write_bootstrap(state_dir, model)
        return
    # the child sees the modules the service sees, installed or not
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    cmd = [sys.executable, "-m", "cloud_aggregator.bootstrap", str(state_dir), json.dumps(model.to_dict())]
    with subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE) as proc:
        try:
            _, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise BootstrapError(
                f"the version-0 builder for {state_dir} ran past {timeout_s:.0f} s; killed it"
            ) from None
    if proc.returncode != 0:
        tail = err.decode(errors="replace")[-4000:]
        raise BootstrapError(
            f"building version 0 for {state_dir} failed in its builder process (exit code {proc.returncode}; "
            f"a negative one is the signal that killed it):\n{tail}"
        )


def main(argv: list[str] | None = None) -> int:
    """``python -m cloud_aggregator.bootstrap STATE_DIR MODEL_JSON``: the child's entry point."""
    state_dir, model = argv if argv is not None else sys.argv[1:]
    write_bootstrap(Path(state_dir), EdgeModelConfig.from_dict(json.loads(model)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
