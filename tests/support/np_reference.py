"""An independent numpy model of the aggregation maths, written from the documented formulas.

Why: a test that computes its expectation with the code under test reproduces that code's bugs.
Nothing here imports ``cloud_aggregator``; every formula is the one its docstring states:

* scaling convention: an edge's effective update is ``s_k B_k A_k`` with ``s_k = alpha_k / r_k``;
  the global is stored at scaling 1 (``s_k`` folded into ``B``);
* fedavg: ``A = Σ w_k A_k``, ``B = Σ w_k s_k B_k`` with ``w_k ∝ n_k d_k`` (ranks zero-padded);
* hetlora: the same with ``w_k ∝ n_k d_k ‖s_k B_k A_k‖_F``; fedsa: only ``A``;
* flora / flexlora: the global's ``B A`` is exactly ``Σ w_k s_k B_k A_k``;
* modality-aware: a module of modality ``m`` only over edges with ``n_k(m) > 0``, weighted by it;
* extras (non-LoRA tensors): ``Σ w_k t_k`` with ``w_k ∝ n_k d_k``;
* FedBuff step: ``ᾱ = Σ d_k n_k / Σ n_k`` per module, ``x ← x + ᾱ (agg - x)`` (rank axis zero-padded);
* discounts: polynomial ``(1+s)^-a``, hinge ``1`` for ``s ≤ b`` else ``1 / (a (s-b) + 1)``, constant 1.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

_LORA = re.compile(r"^(.+)\.lora_([AB])\.weight$")
_MODALITY = re.compile(r"\.modality_proj\.([^.]+)\.")


def split(name: str) -> tuple[str, str] | None:
    m = _LORA.match(name)
    return None if m is None else (m.group(1), m.group(2))


def modality(name: str) -> str | None:
    m = _MODALITY.search(name if name.endswith(".") else name + ".")
    return None if m is None else m.group(1)


@dataclass
class Up:
    """One edge's upload, as plain float64 arrays."""

    tensors: dict[str, np.ndarray]
    rank: int
    alpha: float
    samples: int
    modalities: dict[str, int] = field(default_factory=dict)

    @property
    def s(self) -> float:
        return self.alpha / self.rank


def polynomial(s: int, a: float = 0.5) -> float:
    return (1.0 + s) ** (-a)


def hinge(s: int, a: float = 10.0, b: int = 4) -> float:
    return 1.0 if s <= b else 1.0 / (a * (s - b) + 1.0)


def samples_weight(u: Up, key: str) -> float | None:
    return float(u.samples)


def modality_weight(u: Up, key: str) -> float | None:
    mod = modality(key)
    if mod is None:
        return float(u.samples)
    n = u.modalities.get(mod, 0)
    return float(n) if n > 0 else None


def normalized(w: Sequence[float]) -> np.ndarray:
    w = np.asarray(w, dtype=np.float64)
    return w / w.sum() if w.sum() > 0 else np.full(len(w), 1.0 / len(w))


def pad(t: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    out = np.zeros(tuple(shape), dtype=np.float64)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


def pairs(u: Up) -> dict[str, dict[str, np.ndarray]]:
    out: dict[str, dict[str, np.ndarray]] = {}
    for name, t in u.tensors.items():
        p = split(name)
        if p is not None:
            out.setdefault(p[0], {})[p[1]] = t
    return out


def extras(u: Up) -> dict[str, np.ndarray]:
    return {n: t for n, t in u.tensors.items() if split(n) is None}


WeightFn = Callable[[Up, str], "float | None"]


def eligible(ups: Sequence[Up], ds: Sequence[float], module: str, weight: WeightFn, need_b: bool):
    """``(up, n_k, d_k)`` of the edges that take part in ``module``, in upload order."""
    out = []
    for u, d in zip(ups, ds, strict=True):
        p = pairs(u).get(module, {})
        if "A" not in p or (need_b and "B" not in p):
            continue
        n = weight(u, module)
        if n is not None:
            out.append((u, n, d))
    return out


def aggregate(
    rule: str,
    prev: Mapping[str, np.ndarray] | None,
    ups: Sequence[Up],
    ds: Sequence[float] | None = None,
    weight: WeightFn = samples_weight,
) -> dict[str, np.ndarray]:
    """Next global tensors for a factor-space rule (``fedavg``, ``hetlora``, ``fedsa``)."""
    ds = [1.0] * len(ups) if ds is None else list(ds)
    out = dict(prev or {})
    modules = list(dict.fromkeys(m for u in ups for m in pairs(u)))
    for m in modules:
        members = eligible(ups, ds, m, weight, need_b=rule != "fedsa")
        if not members:
            continue
        r_max = max(u.rank for u, _, _ in members)
        a_k = [pad(pairs(u)[m]["A"], (r_max, pairs(u)[m]["A"].shape[1])) for u, _, _ in members]
        w = [n * d for _, n, d in members]
        out.pop(f"{m}.lora_A.weight", None)
        out.pop(f"{m}.lora_B.weight", None)
        if rule == "fedsa":
            out[f"{m}.lora_A.weight"] = sum(wi * a for wi, a in zip(normalized(w), a_k, strict=True))
            continue
        b_k = [pad(u.s * pairs(u)[m]["B"], (pairs(u)[m]["B"].shape[0], r_max)) for u, _, _ in members]
        if rule == "hetlora":
            w = [wi * np.linalg.norm(b @ a) for wi, a, b in zip(w, a_k, b_k, strict=True)]
        wn = normalized(w)
        out[f"{m}.lora_A.weight"] = sum(wi * a for wi, a in zip(wn, a_k, strict=True))
        out[f"{m}.lora_B.weight"] = sum(wi * b for wi, b in zip(wn, b_k, strict=True))
    for name in dict.fromkeys(n for u in ups for n in extras(u)):
        members = [(u, weight(u, name), d) for u, d in zip(ups, ds, strict=True) if name in u.tensors]
        members = [(u, n, d) for u, n, d in members if n is not None]
        if members:
            wn = normalized([n * d for _, n, d in members])
            out[name] = sum(wi * u.tensors[name] for wi, (u, _, _) in zip(wn, members, strict=True))
    return out


def product_target(
    ups: Sequence[Up], module: str, ds: Sequence[float] | None = None, weight: WeightFn = samples_weight
) -> np.ndarray:
    """``Σ w_k s_k B_k A_k`` with ``w_k ∝ n_k d_k``: what flora and flexlora store exactly."""
    ds = [1.0] * len(ups) if ds is None else list(ds)
    members = eligible(ups, ds, module, weight, need_b=True)
    wn = normalized([n * d for _, n, d in members])
    return sum(wi * u.s * pairs(u)[module]["B"] @ pairs(u)[module]["A"] for wi, (u, _, _) in zip(wn, members,
                                                                                                  strict=True))


def steps(ups: Sequence[Up], ds: Sequence[float], weight: WeightFn = samples_weight) -> dict[str, float]:
    """FedBuff's ``ᾱ = Σ d_k n_k / Σ n_k`` per LoRA module and per extra tensor (1 when Σ n_k = 0)."""
    num: dict[str, float] = {}
    den: dict[str, float] = {}
    for u, d in zip(ups, ds, strict=True):
        for key in [*pairs(u), *extras(u)]:
            n = weight(u, key)
            if n is None:
                continue
            num[key] = num.get(key, 0.0) + d * n
            den[key] = den.get(key, 0.0) + n
    return {k: num[k] / den[k] if den[k] > 0 else 1.0 for k in den}


def mix(cur: Mapping[str, np.ndarray], agg: Mapping[str, np.ndarray], alpha: Mapping[str, float]):
    """``x + ᾱ (agg - x)`` per tensor of ``agg``; a grown rank axis is zero-padded first."""
    out = {}
    for name, a in agg.items():
        p = split(name)
        step = alpha.get(p[0] if p else name, 1.0)
        x = cur.get(name)
        if x is None or step >= 1.0:
            out[name] = a
            continue
        shape = [max(i, j) for i, j in zip(x.shape, a.shape, strict=True)]
        x, a = pad(x, shape), pad(a, shape)
        out[name] = x + step * (a - x)
    return out


def fit_rank(t: np.ndarray, kind: str, rank: int) -> np.ndarray:
    """First ``rank`` components of a factor (rows of A, columns of B), zero-padded when short."""
    if kind == "A":
        return pad(t[:rank], (rank, t.shape[1]))
    return pad(t[:, :rank], (t.shape[0], rank))


def best_rank(delta: np.ndarray, rank: int) -> np.ndarray:
    """Eckart-Young: the best rank-``rank`` approximation of ``delta``."""
    u, s, vh = np.linalg.svd(delta, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]
