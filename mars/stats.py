"""Statistics for trustworthy comparisons (``mars compare``) and for reading
expert specialisation.

* :func:`paired_interval`: the mean of per-seed paired differences with a 95%
  (or any) interval, from the paired t distribution (default) or a
  percentile bootstrap over seeds; significant when the interval excludes 0.
* :func:`paired_p_value` and :func:`holm`: the two-sided paired-t p-value of
  a set of per-seed differences, and Holm's step-down correction of a family
  of p-values (for several pre-registered comparisons at once).
* :func:`t_quantile`: Student-t quantiles (regularised incomplete beta by a
  continued fraction, inverted by bisection; no scipy at run time).
* :func:`specialisation_nmi`: normalised mutual information between the
  missing pattern of a token and the expert it is routed to, from the
  (pattern x expert) assignment counts of an evaluation.
* :func:`usage_order`: a row and column order of an expert-usage heatmap that
  puts each pattern beside the others that prefer the same expert.
"""
from __future__ import annotations

import math
import random
import statistics
from typing import Sequence

__all__ = ["t_cdf", "t_quantile", "paired_interval", "paired_p_value", "holm", "specialisation_nmi", "usage_order",
           "nmi_of"]


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` > 0 degrees of freedom."""
    if df <= 0:
        raise ValueError(f"df must be > 0, got {df}")
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom (0 < p < 1)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def paired_interval(diffs: Sequence[float], level: float = 0.95, method: str = "t",
                    resamples: int = 10000, seed: int = 0) -> dict:
    """Mean of the paired differences ``diffs`` (one per seed: method minus
    reference on the same seed, splits and masks) with a ``level`` interval.

    method "t": mean ± t_{(1+level)/2, n-1} * sd / sqrt(n); "bootstrap": the
    percentile interval of the mean over ``resamples`` resamples of the seeds
    (deterministic by ``seed``). -> {"n", "mean", "sd", "low", "high",
    "significant" (the interval excludes 0), "method", "level"}; with one
    seed the interval is undefined (NaN) and nothing is significant."""
    d = [float(x) for x in diffs]
    if not d:
        raise ValueError("paired_interval: no differences")
    if method not in ("t", "bootstrap"):
        raise ValueError(f"method must be 't' or 'bootstrap', got {method!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    n, mean = len(d), statistics.fmean(d)
    sd = statistics.stdev(d) if n > 1 else float("nan")
    if n < 2:
        low = high = float("nan")
    elif method == "t":
        half = t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)
        low, high = mean - half, mean + half
    else:
        rng = random.Random(seed)
        means = sorted(statistics.fmean(rng.choices(d, k=n)) for _ in range(resamples))
        a = (1.0 - level) / 2.0
        low = means[min(resamples - 1, int(math.floor(a * resamples)))]
        high = means[min(resamples - 1, int(math.ceil((1.0 - a) * resamples)) - 1)]
    significant = n > 1 and (low > 0.0 or high < 0.0)
    return {"n": n, "mean": mean, "sd": sd, "low": low, "high": high, "significant": bool(significant),
            "method": method, "level": level}


def paired_p_value(diffs: Sequence[float]) -> float:
    """Two-sided p-value of the paired t test that the mean difference is 0
    (NaN with fewer than two differences; 0 when they are equal and not 0,
    1 when all are 0)."""
    d = [float(x) for x in diffs]
    n = len(d)
    if n < 2:
        return float("nan")
    mean, sd = statistics.fmean(d), statistics.stdev(d)
    if sd == 0.0:
        return 1.0 if mean == 0.0 else 0.0
    t = abs(mean) / (sd / math.sqrt(n))
    return max(0.0, min(1.0, 2.0 * (1.0 - t_cdf(t, n - 1))))


def holm(p_values: Sequence[float], alpha: float = 0.05) -> list[dict]:
    """Holm's step-down correction of a family of p-values: -> per p-value
    {"p", "adjusted" (the Holm-adjusted p-value), "rejected" (adjusted <=
    alpha)}, in the input order. Controls the family-wise error rate at
    ``alpha`` under any dependence."""
    ps = [float(p) for p in p_values]
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    adjusted = [0.0] * len(ps)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
        adjusted[i] = running
    return [{"p": p, "adjusted": a, "rejected": a <= alpha} for p, a in zip(ps, adjusted)]


def nmi_of(a: Sequence[int], b: Sequence[int]) -> float:
    """NMI between two labelings of the same items (e.g. the expert each
    routed token went to, and its hidden regime): :func:`specialisation_nmi`
    of their contingency counts."""
    a, b = list(a), list(b)
    if len(a) != len(b):
        raise ValueError(f"nmi_of: labelings of different lengths {len(a)} and {len(b)}")
    rows, cols = sorted(set(a)), sorted(set(b))
    ri, ci = {x: i for i, x in enumerate(rows)}, {x: i for i, x in enumerate(cols)}
    counts = [[0] * len(cols) for _ in rows]
    for x, y in zip(a, b):
        counts[ri[x]][ci[y]] += 1
    return specialisation_nmi(counts)


def _entropy(counts: Sequence[float]) -> float:
    total = float(sum(counts))
    return -sum(c / total * math.log(c / total) for c in counts if c > 0) if total > 0 else 0.0


def specialisation_nmi(counts: Sequence[Sequence[float]]) -> float:
    """NMI between missing pattern and chosen expert from the assignment counts
    ``counts`` [patterns, experts] (each routed (token, slot) counted once):
    I(pattern; expert) / mean(H(pattern), H(expert)) (the arithmetic
    normalisation), in [0, 1]. 0 when the experts are used alike by every
    pattern, 1 when each pattern has its own experts. NaN without
    assignments; 0 when either entropy is 0 (one pattern, or one expert)."""
    rows = [[float(c) for c in row] for row in counts]
    total = sum(sum(r) for r in rows)
    if total <= 0:
        return float("nan")
    if any(c < 0 for r in rows for c in r):
        raise ValueError("specialisation_nmi: counts must be >= 0")
    h_rows = _entropy([sum(r) for r in rows])
    h_cols = _entropy([sum(col) for col in zip(*rows)])
    if h_rows == 0.0 or h_cols == 0.0:
        return 0.0
    joint = _entropy([c for r in rows for c in r])
    mutual = h_rows + h_cols - joint
    return max(0.0, min(1.0, mutual / (0.5 * (h_rows + h_cols))))


def usage_order(usage: Sequence[Sequence[float]]) -> tuple[list[int], list[int]]:
    """(row order, column order) for an expert-usage heatmap [patterns,
    experts]: experts by their total share (most used first); patterns grouped
    by their most used expert in that order, and within a group by how much of
    their tokens that expert takes (highest first). A specialised router then
    shows as blocks down the diagonal."""
    rows = [[float(c) for c in row] for row in usage]
    if not rows:
        return [], []
    E = len(rows[0])
    cols = sorted(range(E), key=lambda e: (-sum(r[e] for r in rows), e))
    rank = {e: i for i, e in enumerate(cols)}
    top = [max(range(E), key=lambda e: (r[e], -e)) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: (rank[top[i]], -rows[i][top[i]], i))
    return order, cols
