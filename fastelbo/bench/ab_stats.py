"""The statistics of an A/B timing run: Wilcoxon signed-rank test on paired
log-ratios, Hodges-Lehmann estimate and confidence interval.

Rounds alternate A B B A (one ABBA block gives two pairs, (A, B) and (B, A)),
so the two rounds of a pair ran moments apart and share the machine's load of
the moment. Per pair d = ln(t_B / t_A). When A and B are the same build, the
two rounds of a pair are exchangeable, so d is symmetric about 0 whatever its
distribution: the exact Wilcoxon signed-rank test needs no other assumption,
and as a rank test a burst of load that hits one pair moves one rank. The
ratio B/A is exp of the Hodges-Lehmann estimate (the median of the Walsh
averages (d_i + d_j) / 2, i <= j) and its confidence interval the matching
order statistics of the Walsh averages, from the exact null distribution.

The confidence is family-wise over the cases of a run (Bonferroni: each case
at 1 - alpha / cases), so a run of 45 cases calls any of them significant by
chance with probability at most alpha. Two processes of one build still
differ for reasons the test cannot see, because they persist for a whole case
in one process (where its heap and pages land, which cores its threads share
with other programs): on the shared 2-core machine of 2026-12-07 self-A/B runs
found such differences of 1-3% routinely and up to 7% under heavy load, all
"significant". So a difference is called slower or faster only beyond the
resolution (by default the failure threshold, 10%); within it, it is reported
as no difference, marked significant. A dedicated, quiet machine can use a
finer one (--resolution 0.03).
"""

from __future__ import annotations

import functools
import math
import statistics

TEST_NAME = ("Wilcoxon signed-rank test (exact) on ln(t_B/t_A) of adjacent rounds (ABBA blocks); "
             "Hodges-Lehmann ratio and confidence interval")
DEFAULT_RESOLUTION = 0.10


@functools.lru_cache(maxsize=64)
def signed_rank_cdf(n: int) -> tuple[float, ...]:
    """P(W+ <= w), w = 0..n(n+1)/2, for n pairs under the null (exact: subset sums of 1..n)."""
    top = n * (n + 1) // 2
    counts = [1] + [0] * top
    for r in range(1, n + 1):
        for s in range(top, r - 1, -1):
            counts[s] += counts[s - r]
    total, acc, out = 2.0 ** n, 0, []
    for c in counts:
        acc += c
        out.append(acc / total)
    return tuple(out)


def walsh_averages(d: list[float]) -> list[float]:
    return sorted((d[i] + d[j]) / 2.0 for i in range(len(d)) for j in range(i, len(d)))


def hodges_lehmann_ci(d: list[float], alpha: float) -> tuple[float, float, float]:
    """(estimate, low, high) of the shift of d at confidence 1 - alpha; (-inf, inf) when n is too small."""
    w = walsh_averages(d)
    if not w:
        return math.nan, -math.inf, math.inf
    est = statistics.median(w)
    cdf = signed_rank_cdf(len(d))
    k = 0  # largest k with P(W+ <= k-1) <= alpha/2: the interval [w_(k), w_(M+1-k)]
    while k < len(cdf) and cdf[k] <= alpha / 2:
        k += 1
    if k == 0:
        return est, -math.inf, math.inf
    return est, w[k - 1], w[len(w) - k]


def signed_rank_p(d: list[float]) -> float:
    """Two-sided exact p-value of the Wilcoxon signed-rank test of a zero shift (zeros dropped)."""
    nz = [x for x in d if x != 0]
    n = len(nz)
    if n == 0:
        return 1.0
    order = sorted(range(n), key=lambda i: abs(nz[i]))
    ranks = [0.0] * n
    i = 0
    while i < n:  # mid-ranks for ties of |d|
        j = i
        while j + 1 < n and abs(nz[order[j + 1]]) == abs(nz[order[i]]):
            j += 1
        for m in range(i, j + 1):
            ranks[order[m]] = (i + j) / 2.0 + 1.0
        i = j + 1
    w_plus = sum(r for r, x in zip(ranks, nz) if x > 0)
    cdf = signed_rank_cdf(n)
    top = n * (n + 1) // 2
    low = min(w_plus, top - w_plus)
    return min(1.0, 2.0 * cdf[int(math.floor(low))])


def min_pairs(alpha: float) -> int:
    """The fewest pairs whose interval at confidence 1 - alpha is finite."""
    n = 1
    while 2.0 * 0.5 ** n > alpha:
        n += 1
    return n


def compare_pairs(a_s: list[float], b_s: list[float], alpha_case: float, threshold: float,
                  resolution: float = DEFAULT_RESOLUTION) -> dict:
    """Verdict of one case from its paired round times (seconds per call).

    slower / faster: the interval excludes 1 and the ratio is outside 1 +- resolution;
    fail: slower with a ratio above 1 + threshold."""
    d = [math.log(b / a) for a, b in zip(a_s, b_s) if a > 0 and b > 0]
    est, lo, hi = hodges_lehmann_ci(d, alpha_case)
    ratio = math.exp(est) if d else math.nan
    ci = [math.exp(lo) if lo > -math.inf else 0.0, math.exp(hi) if hi < math.inf else math.inf]
    significant = lo > 0 or hi < 0
    if significant and lo > 0 and ratio > 1.0 + resolution:
        verdict = "slower"
    elif significant and hi < 0 and ratio < 1.0 / (1.0 + resolution):
        verdict = "faster"
    else:
        verdict = "no difference"
    return {"pairs": len(d), "ratio": ratio, "ci": ci, "p": signed_rank_p(d), "significant": significant,
            "verdict": verdict, "fail": verdict == "slower" and ratio > 1.0 + threshold,
            "a_median_s": statistics.median(a_s) if a_s else None,
            "b_median_s": statistics.median(b_s) if b_s else None}


__all__ = ["TEST_NAME", "DEFAULT_RESOLUTION", "signed_rank_cdf", "walsh_averages", "hodges_lehmann_ci",
           "signed_rank_p", "min_pairs", "compare_pairs"]
