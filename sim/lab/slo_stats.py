"""Judging an SLO on a finite run: distribution-free confidence bounds for a percentile and a fraction.

A simulated run has n requests; its p95 is an estimate. To say "this load meets p95 E2E <= 5 s" with a
stated confidence rather than on a lucky draw, the planner (sim.lab.planner) judges each percentile
objective on a one-sided upper confidence bound of the quantile, and the goodput objective on a lower
bound of the good fraction:

- quantile_upper_bound: the k-th smallest of n values is >= the true q-quantile with probability
  P(Binomial(n, q) <= k - 1) (the number of values below the quantile is binomial). The bound is the
  smallest such order statistic whose probability reaches `confidence`; with too few values for that
  confidence it is +inf. Exact for independent draws from any continuous distribution.
- fraction_lower_bound: the Clopper-Pearson one-sided lower bound of a binomial proportion.

Requests of one run are not independent (they queue behind each other), so the stated confidence is
nominal; more requests, or pooled independent replicates, tighten it. Failed requests enter as +inf.
Plain Python and numpy; no scipy.
"""
from __future__ import annotations

import math

import numpy as np


def binom_pmf(n: int, p: float) -> np.ndarray:
    """P(X = k) for k = 0..n, X ~ Binomial(n, p), computed in log space (n up to millions)."""
    k = np.arange(n + 1, dtype=float)
    if p <= 0.0:
        return (k == 0).astype(float)
    if p >= 1.0:
        return (k == n).astype(float)
    j = k[1:]
    log_comb = np.concatenate(([0.0], np.cumsum(np.log((n - j + 1.0) / j))))  # log C(n, k), exact recurrence
    return np.exp(log_comb + k * math.log(p) + (n - k) * math.log1p(-p))


def quantile_estimate(values: np.ndarray, q: float) -> float:
    """The q-quantile of values (numpy's linear interpolation, vLLM's percentile); +inf where it reaches an inf."""
    x = np.sort(np.asarray(values, dtype=float))
    if x.size == 0:
        return math.inf
    h = (x.size - 1) * q
    lo = int(math.floor(h))
    hi = min(lo + 1, x.size - 1)
    if math.isinf(x[lo]) or (h > lo and math.isinf(x[hi])):
        return math.inf
    return float(x[lo] + (h - lo) * (x[hi] - x[lo]))


def quantile_rank(n: int, q: float, confidence: float) -> int | None:
    """The 1-based rank k of the smallest order statistic that bounds the q-quantile from above with
    probability >= confidence, among n independent values; None when even the largest does not."""
    if n == 0:
        return None
    cdf = np.cumsum(binom_pmf(n, q))  # cdf[j] = P(X <= j)
    # k - 1 = first j with cdf[j] >= confidence; a tiny slack absorbs float rounding of an exact tie.
    hits = np.nonzero(cdf >= confidence - 1e-12)[0]
    if hits.size == 0 or hits[0] + 1 > n:
        return None
    return int(hits[0]) + 1


def quantile_upper_bound(values: np.ndarray, q: float, confidence: float) -> float:
    """An upper bound of the q-quantile at the given one-sided confidence (see quantile_rank); +inf when the
    values are too few for that confidence or the bounding value is a failure (+inf)."""
    x = np.sort(np.asarray(values, dtype=float))
    k = quantile_rank(x.size, q, confidence)
    return math.inf if k is None else float(x[k - 1])


def fraction_lower_bound(successes: int, n: int, confidence: float) -> float:
    """Clopper-Pearson one-sided lower bound of a proportion: the p at which P(X >= successes) = 1 - confidence."""
    if n == 0 or successes == 0:
        return 0.0
    alpha = 1.0 - confidence

    def tail(p: float) -> float:  # P(X >= successes | p), increasing in p
        return float(binom_pmf(n, p)[successes:].sum())

    lo, hi = 0.0, successes / n
    for _ in range(60):  # bisection to ~1e-18 of the interval
        mid = 0.5 * (lo + hi)
        if tail(mid) < alpha:
            lo = mid
        else:
            hi = mid
    return lo
