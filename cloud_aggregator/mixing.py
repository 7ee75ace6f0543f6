"""FedBuff's staleness-scaled server step, for strategies whose globals share factor coordinates.

Strategies normalise weights within a batch, so on their own a lone stale update would
replace the global as fully as a fresh one.  FedBuff (Nguyen et al. 2022) instead steps by
``Σ_k s(τ_k) n_k (x_k - x) / Σ_k n_k``: this module computes, per tensor, the step size
``ᾱ = Σ s(τ_k) n_k / Σ n_k`` over the edges eligible for that tensor (``n_k`` is the strategy's
own statistic, ``base_weight``) and moves the global that fraction of the way to the aggregate.
A batch of fresh updates gives ``ᾱ = 1`` (plain replacement).  Only meaningful in factor space;
stacked/SVD forms (flora, flexlora) keep the discount relative within the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from megace_common.lora import split_lora

from .contribution import Contribution, parse
from .server_opt import _common_shape, _pad_to
from .strategies import Strategy


def step_sizes(
    strategy: Strategy, contributions: Sequence[Contribution], discounts: Sequence[float]
) -> dict[str, float]:
    """``ᾱ`` per module (LoRA) or tensor name (others)."""
    num: dict[str, float] = {}
    den: dict[str, float] = {}
    for c, d in zip(contributions, discounts, strict=True):
        p = parse(c.tensors)
        for key in (*p.pairs, *p.extras):
            bw = strategy.base_weight(c, key)
            if bw is None:
                continue
            num[key] = num.get(key, 0.0) + d * bw
            den[key] = den.get(key, 0.0) + bw
    return {k: (num[k] / den[k] if den[k] > 0 else 1.0) for k in den}


def mix(
    current: dict[str, np.ndarray], aggregate: dict[str, np.ndarray], steps: dict[str, float]
) -> dict[str, np.ndarray]:
    """``current + ᾱ (aggregate - current)`` per tensor; a grown rank axis is zero-padded first (exact)."""
    out = dict(aggregate)
    for name, agg in aggregate.items():
        cur = current.get(name)
        lora = split_lora(name)
        a = steps.get(lora[0] if lora is not None else name, 1.0)
        if cur is None or a >= 1.0:  # a tensor nobody sent has no step (1.0): kept as it is
            continue
        shape = _common_shape(name, cur, agg)
        cur_p, agg_p = _pad_to(cur, shape), _pad_to(agg, shape)
        out[name] = cur_p + a * (agg_p - cur_p)
    return out
