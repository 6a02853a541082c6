"""How well one ranking of components predicts another: Spearman, Kendall, sign agreement, top-k precision and
recall with exact binomial bounds, and the re-runs needed to find the true top-k.
"""

from __future__ import annotations

import math

import numpy as np


def ranks(a) -> np.ndarray:
    """Ranks 1 .. n, ties given their average rank (as Spearman's rho with ties needs)."""
    a = np.asarray(a, dtype=np.float64)
    order = np.argsort(a, kind="stable")
    sorted_a = a[order]
    r = np.empty(len(a))
    start = 0
    for i in range(1, len(a) + 1):
        if i == len(a) or sorted_a[i] != sorted_a[start]:
            r[order[start:i]] = (start + 1 + i) / 2  # the mean of ranks start+1 .. i
            start = i
    return r


def spearman(a, b) -> float | None:
    """Spearman's rho: the Pearson correlation of the ranks (ties averaged); None when a side is constant."""
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return None if den == 0 else float((ra * rb).sum() / den)


def kendall(a, b) -> float | None:
    """Kendall's tau-b: (concordant - discordant) / sqrt((n0 - ties_a)(n0 - ties_b)) over all pairs (O(n^2),
    in blocks of rows); None when a side is constant."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    n = len(a)
    s = ties_a = ties_b = 0
    for i in range(0, n, 512):
        da = np.sign(a[i:i + 512, None] - a[None, :])  # [block, n]
        db = np.sign(b[i:i + 512, None] - b[None, :])
        upper = np.arange(i, min(i + 512, n))[:, None] < np.arange(n)[None, :]  # each pair once
        s += int((da * db)[upper].sum())
        ties_a += int((da == 0)[upper].sum())
        ties_b += int((db == 0)[upper].sum())
    n0 = n * (n - 1) // 2
    den = math.sqrt((n0 - ties_a) * (n0 - ties_b))
    return None if den == 0 else s / den


def top_set(values, k) -> set[int]:
    """The indices of the k largest |values|, with every index tied with the k-th included."""
    mag = np.abs(np.asarray(values, dtype=np.float64))
    if k >= len(mag):
        return set(range(len(mag)))
    kth = np.sort(mag)[::-1][k - 1]
    return set(np.flatnonzero(mag >= kth).tolist())


def reruns_to_top_k(prism, total, k) -> int:
    """The AtP* cost: verifying components in the order of |prism| (largest first), how many re-runs until every
    one of the true top-k by |total| has been run (ties in |total| broken by index, so exactly k are sought)."""
    order = np.argsort(-np.abs(np.asarray(prism, dtype=np.float64)), kind="stable")
    true = np.argsort(-np.abs(np.asarray(total, dtype=np.float64)), kind="stable")[:k]
    rank = np.empty(len(order), dtype=int)
    rank[order] = np.arange(1, len(order) + 1)
    return int(rank[true].max())


def binomial_upper(x: int, m: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson upper bound on a proportion after x successes in m draws.

    Math:   the p with P(X <= x; m, p) = 1 - confidence (found by bisection; x = 0 gives 1 - (1 - confidence)^(1/m))
    """
    if m <= 0:
        return 1.0
    if x >= m:
        return 1.0
    alpha = 1 - confidence

    def cdf(p):  # P(X <= x) for X ~ Binomial(m, p), summed in log space
        logs = [math.lgamma(m + 1) - math.lgamma(i + 1) - math.lgamma(m - i + 1) + i * math.log(p)
                + (m - i) * math.log1p(-p) for i in range(x + 1)]
        top = max(logs)
        return math.exp(top) * sum(math.exp(v - top) for v in logs)

    lo, hi = x / m, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if mid <= 0 or cdf(mid) > alpha:
            lo = mid
        else:
            hi = mid
    return hi


def agreement(prism, total, k) -> dict:
    """How far the prism ranks components as their total effects do (one readout column).

    spearman, kendall:  rank correlations of |prism| vs |total|
    sign_agreement:     the fraction of components whose prism and total have the same sign (0 matches only 0)
    top_k_precision:    |P & T| / |P|,  top_k_recall: |P & T| / |T|   (P, T: the top-k by |prism| and by |total|,
                        each with its ties at the k-th value, so the two differ only when there are ties)
    reruns_to_true_top_k: re-runs needed to find the true top-k when verifying in prism order (AtP*)
    """
    prism, total = np.asarray(prism, dtype=np.float64), np.asarray(total, dtype=np.float64)
    k = int(min(k, len(prism)))
    Pk, Tk = top_set(prism, k), top_set(total, k)
    both = len(Pk & Tk)
    return {"n": int(len(prism)), "k": k,
            "spearman": spearman(np.abs(prism), np.abs(total)), "kendall": kendall(np.abs(prism), np.abs(total)),
            "sign_agreement": float(np.mean(np.sign(prism) == np.sign(total))),
            "top_k_precision": both / len(Pk), "top_k_recall": both / len(Tk),
            "reruns_to_true_top_k": reruns_to_top_k(prism, total, k)}
