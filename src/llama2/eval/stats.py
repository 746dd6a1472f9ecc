"""The small statistics the evaluation and the reproduction table state their numbers with.

All intervals are two-sided at 95% unless `z` says otherwise (`Z95_ONE_SIDED` gives the one-sided
95% bound as the near end of a two-sided 90% interval):

- `wilson_interval(k, n)`: a proportion (Wilson score interval; exact ends at 0 and n).
- `newcombe_interval(k1, n1, k2, n2)`: the difference p1 - p2 of two independent proportions
  (Newcombe's hybrid score interval, method 10 of Newcombe 1998), well behaved at 0 of n.
  On two proportions measured on the same items it is conservative where the items' outcomes
  correlate positively, as two models' on the same prompts do.
- `mean_interval(xs)`: a mean (normal interval, sample standard deviation); on paired data
  (`paired_interval(a, b)`: the mean of a_i - b_i) it is the paired interval.
- `welch_interval(a, b)`: the difference of two independent means (normal, unpooled variances).
- `mcnemar_p(b, c)`: the exact two-sided McNemar test of paired binary outcomes from the two
  discordant counts (b: only the first right, c: only the second right).
- `win_rate_interval(win, tie, loss)`: the win rate counting a tie as half, a mean of 1 / 0.5 / 0
  per prompt, with its normal interval computed from the three counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Z95 = 1.959964
Z95_ONE_SIDED = 1.644854


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion; (0, 1) when there is no data."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # Exact ends: 0 of n has a lower bound of 0, n of n an upper bound of 1 (no rounding).
    return (0.0 if successes <= 0 else max(0.0, centre - half),
            1.0 if successes >= n else min(1.0, centre + half))


def newcombe_interval(k1: float, n1: int, k2: float, n2: int,
                      z: float = Z95) -> tuple[float, float]:
    """Interval of p1 - p2 (p1 = k1 / n1, p2 = k2 / n2, independent samples): Newcombe's hybrid
    score interval from the two Wilson intervals; (-1, 1) when either sample is empty."""
    if n1 <= 0 or n2 <= 0:
        return (-1.0, 1.0)
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson_interval(k1, n1, z)
    l2, u2 = wilson_interval(k2, n2, z)
    d = p1 - p2
    return (d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2),
            d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2))


def mean_interval(xs: Sequence[float], z: float = Z95) -> tuple[float, float, float]:
    """(mean, low, high): the normal interval of the mean of `xs` (sample standard deviation);
    infinite ends with fewer than two values."""
    n = len(xs)
    if n == 0:
        return (0.0, -math.inf, math.inf)
    m = math.fsum(xs) / n
    if n < 2:
        return (m, -math.inf, math.inf)
    sd = math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (n - 1))
    half = z * sd / math.sqrt(n)
    return (m, m - half, m + half)


def paired_interval(a: Sequence[float], b: Sequence[float],
                    z: float = Z95) -> tuple[float, float, float]:
    """(mean, low, high) of a_i - b_i over paired items (the same prompts or pairs)."""
    if len(a) != len(b):
        raise ValueError(f"paired samples of different sizes: {len(a)} and {len(b)}")
    return mean_interval([x - y for x, y in zip(a, b)], z)


def welch_interval(a: Sequence[float], b: Sequence[float],
                   z: float = Z95) -> tuple[float, float, float]:
    """(mean(a) - mean(b), low, high) for independent samples (normal, unpooled variances)."""
    ma, la, _ = mean_interval(a, z)
    mb, lb, _ = mean_interval(b, z)
    if not (math.isfinite(la) and math.isfinite(lb)):
        return (ma - mb, -math.inf, math.inf)
    half = math.hypot(ma - la, mb - lb)
    return (ma - mb, ma - mb - half, ma - mb + half)


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value from the discordant counts b and c (a binomial test of
    b against Binomial(b + c, 1/2)); 1.0 without discordant pairs."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def win_rate_interval(win: int, tie: int, loss: int,
                      z: float = Z95) -> tuple[float, float, float]:
    """(rate, low, high): the win rate with a tie as half a win and its normal interval, the
    interval of the mean of the per-prompt values 1 (win), 0.5 (tie) and 0 (loss)."""
    return mean_interval([1.0] * win + [0.5] * tie + [0.0] * loss, z)
