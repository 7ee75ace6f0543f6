"""Paired significance tests over seeds: the exact Wilcoxon signed-rank test and the paired t-test.

Why both: with 5 seeds the exact two-sided Wilcoxon p-value cannot go below 2/32 = 0.0625 (all five
differences of one sign), so a "p < 0.05" goal over 5 paired seeds is only reachable by the t-test, which
assumes roughly normal differences. The report gives both and says which one a verdict uses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import product


@dataclass(frozen=True)
class PairedTest:
    n: int  # pairs with a finite difference
    mean_diff: float
    t: float
    p_t: float  # two-sided paired t-test
    p_wilcoxon: float  # two-sided exact signed-rank test (zero differences dropped)


def _ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def wilcoxon_exact(diffs: Sequence[float]) -> float:
    """Two-sided exact p-value of the signed-rank statistic, by enumerating all 2^n sign patterns (n <= 20)."""
    d = [x for x in diffs if math.isfinite(x) and x != 0]
    n = len(d)
    if n == 0:
        return 1.0
    if n > 20:
        raise ValueError("exact enumeration is for n <= 20 pairs")
    ranks = _ranks([abs(x) for x in d])
    observed = sum(r for r, x in zip(ranks, d, strict=True) if x > 0)
    expected = sum(ranks) / 2
    extreme = abs(observed - expected) - 1e-9
    hits = sum(abs(sum(r for r, s in zip(ranks, signs, strict=True) if s) - expected) >= extreme
               for signs in product((False, True), repeat=n))
    return hits / 2**n


def student_t_sf(t: float, df: int) -> float:
    """P(T > t) for Student's t with ``df`` degrees of freedom (regularized incomplete beta, via scipy if present)."""
    try:
        from scipy.stats import t as student
    except ImportError:  # pragma: no cover - scipy ships with the run extra
        return _t_sf_series(t, df)
    return float(student.sf(t, df))


def _t_sf_series(t: float, df: int) -> float:
    """Fallback: numerical integration of the t density (Simpson, fine grid); accurate to ~1e-6 here."""
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    a, b, n = 0.0, abs(t), 20000
    h = (b - a) / n
    f = [c * (1 + (a + i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(n + 1)]
    area = h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))
    return 0.5 - area if t >= 0 else 0.5 + area


def paired(a: Sequence[float], b: Sequence[float]) -> PairedTest:
    """Tests of ``a - b`` pair by pair (same seed); non-finite pairs are dropped."""
    d = [x - y for x, y in zip(a, b, strict=True) if math.isfinite(x) and math.isfinite(y)]
    n = len(d)
    if n < 2:
        return PairedTest(n, d[0] if d else math.nan, math.nan, math.nan, 1.0)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    if sd == 0:
        t = math.inf if mean > 0 else -math.inf if mean < 0 else 0.0
        p_t = 0.0 if mean != 0 else 1.0
    else:
        t = mean / (sd / math.sqrt(n))
        p_t = min(1.0, 2 * student_t_sf(abs(t), n - 1))
    return PairedTest(n, mean, t, p_t, wilcoxon_exact(d))
