"""Server-side optimisers on the pseudo-gradient ``Δ = aggregate - current`` (FedOpt, Reddi et al. 2021).

``ServerSGD(lr=1, momentum=0)`` is plain replacement by the aggregate; ``lr < 1`` is FedAsync's
mixing ``x ← (1-lr) x + lr·agg``; momentum gives FedAvgM; ``FedAdam`` is adaptive.  All of them
work tensor by tensor in factor space, which is only meaningful when successive globals share
coordinates (``Strategy.factor_space``); for flora/flexlora use ``none``.

Tensors whose rank axis grew (a higher-rank edge joined) are zero-padded before the
difference, which leaves ΔW unchanged.  State (momentum, moments) is exposed as a flat tensor
dict for the ledger.  numpy arrays throughout, in the tensors' own dtype.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from megace_common.lora import split_lora


def _pad_to(t: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``t`` zero-padded at the end of each axis up to ``shape`` (``t`` itself when it has that shape)."""
    if t.shape == tuple(shape):
        return t
    if t.ndim != len(shape) or any(a > b for a, b in zip(t.shape, shape, strict=True)):
        raise ValueError(f"cannot pad {tuple(t.shape)} to {tuple(shape)}")
    out = np.zeros(shape, dtype=t.dtype)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


def _common_shape(name: str, a: np.ndarray, b: np.ndarray) -> tuple[int, ...]:
    """The shape both fit in: equal shapes, or a LoRA factor whose rank axis grew."""
    if a.shape == b.shape:
        return a.shape
    if split_lora(name) is None or a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"{name}: shape changed {tuple(a.shape)} -> {tuple(b.shape)}")
    return tuple(max(x, y) for x, y in zip(a.shape, b.shape, strict=True))


class ServerOptimizer(ABC):
    name: ClassVar[str] = ""

    def step(self, current: dict[str, np.ndarray], aggregate: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """New global tensors; names only in ``aggregate`` are taken as is, names only in ``current`` kept."""
        out = dict(current)
        for name, agg in aggregate.items():
            cur = current.get(name)
            if cur is None:
                out[name] = agg
                continue
            shape = _common_shape(name, cur, agg)
            cur_p, agg_p = _pad_to(cur, shape), _pad_to(agg, shape)
            out[name] = cur_p + self.update(name, agg_p - cur_p)
        return out

    @abstractmethod
    def update(self, name: str, delta: np.ndarray) -> np.ndarray:
        """The step to add to the current tensor given the pseudo-gradient ``delta``."""

    def state_dict(self) -> dict[str, np.ndarray]:
        return {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        return None


class NoServerOpt(ServerOptimizer):
    """The aggregate replaces the global (the right choice for stacked/SVD forms)."""

    name = "none"

    def step(self, current: dict[str, np.ndarray], aggregate: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {**current, **aggregate}

    def update(self, name: str, delta: np.ndarray) -> np.ndarray:
        return delta


class ServerSGD(ServerOptimizer):
    name = "sgd"

    def __init__(self, lr: float = 1.0, momentum: float = 0.0) -> None:
        if lr <= 0 or not 0 <= momentum < 1:
            raise ValueError("need lr > 0 and 0 <= momentum < 1")
        self.lr, self.momentum = lr, momentum
        self.buf: dict[str, np.ndarray] = {}

    def update(self, name: str, delta: np.ndarray) -> np.ndarray:
        if self.momentum:
            prev = self.buf.get(name)
            prev = np.zeros_like(delta) if prev is None else _pad_to(prev, delta.shape)
            delta = self.momentum * prev + delta
            self.buf[name] = delta
        return self.lr * delta

    def state_dict(self) -> dict[str, np.ndarray]:
        return {f"m/{k}": v for k, v in self.buf.items()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.buf = {k[2:]: v for k, v in state.items() if k.startswith("m/")}


class FedAdam(ServerOptimizer):
    """Adam on the pseudo-gradient; ``tau`` is the adaptivity floor from the FedOpt paper."""

    name = "fedadam"

    def __init__(self, lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        if lr <= 0 or not 0 <= beta1 < 1 or not 0 <= beta2 < 1 or tau <= 0:
            raise ValueError("bad FedAdam hyper-parameters")
        self.lr, self.beta1, self.beta2, self.tau = lr, beta1, beta2, tau
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    def update(self, name: str, delta: np.ndarray) -> np.ndarray:
        m = self.m.get(name)
        v = self.v.get(name)
        m = np.zeros_like(delta) if m is None else _pad_to(m, delta.shape)
        v = np.zeros_like(delta) if v is None else _pad_to(v, delta.shape)
        m = self.beta1 * m + (1 - self.beta1) * delta
        v = self.beta2 * v + (1 - self.beta2) * delta * delta
        self.m[name], self.v[name] = m, v
        return self.lr * m / (np.sqrt(v) + self.tau)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {**{f"m/{k}": t for k, t in self.m.items()}, **{f"v/{k}": t for k, t in self.v.items()}}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.m = {k[2:]: t for k, t in state.items() if k.startswith("m/")}
        self.v = {k[2:]: t for k, t in state.items() if k.startswith("v/")}


OPTIMIZERS: dict[str, type[ServerOptimizer]] = {c.name: c for c in (NoServerOpt, ServerSGD, FedAdam)}


def get_server_optimizer(name: str = "none", **config: float) -> ServerOptimizer:
    try:
        return OPTIMIZERS[name](**config)  # type: ignore[arg-type]
    except KeyError:
        raise ValueError(f"unknown server optimizer {name!r}; known: {sorted(OPTIMIZERS)}") from None


def check_compatible(strategy_factor_space: bool, optimizer: ServerOptimizer) -> None:
    """Refuse (at configuration time) an optimizer that would mix unrelated SVD/stacked bases."""
    if not strategy_factor_space and not isinstance(optimizer, NoServerOpt):
        raise ValueError(f"server optimizer {optimizer.name!r} needs a factor-space strategy; use 'none'")
