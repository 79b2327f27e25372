"""The statistics `metacli compare` reports, in the standard library alone.

- Student's t: the two-sided p-value and the 95% quantile for any degrees of freedom
  (from the regularized incomplete beta function, by its continued fraction);
- a mean with its t interval;
- a paired comparison: the mean difference, its 95% t interval and two p-values, the
  paired t-test and Wilcoxon's signed-rank test (exact below 26 non-zero differences
  without ties, else the normal approximation with the tie correction; zero differences
  dropped, as Wilcoxon's and scipy's default), and which of the two decides: Wilcoxon's
  where the differences are heavy-tailed.

tests/test_stats.py holds each against scipy.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

# |skewness| or excess kurtosis above these: the t-test's normality is not to be trusted
SKEW, KURTOSIS = 1.0, 3.0


def _continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _continued_fraction(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom."""
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0
    return incomplete_beta(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(probability: float, df: float) -> float:
    """The ``probability`` quantile (> 0.5) of Student's t, by bisection on the p-value."""
    target = 2.0 * (1.0 - probability)  # the two-sided tail mass
    low, high = 0.0, 1.0
    while t_two_sided_p(high, df) > target:
        high *= 2.0
    for _ in range(200):
        mid = (low + high) / 2.0
        if t_two_sided_p(mid, df) > target:
            low = mid
        else:
            high = mid
    return (low + high) / 2.0


def t95(samples: int) -> float:
    """The two-sided 95% quantile for the mean of ``samples`` values (df = samples - 1)."""
    return t_quantile(0.975, samples - 1)


def mean_ci(values: list[float]) -> tuple[float, float | None]:
    """The mean and the half-width of its 95% t interval (None for fewer than 2 values)."""
    mean = math.fsum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, t95(len(values)) * sd(values) / math.sqrt(len(values))


def sd(values: list[float]) -> float:
    """The sample standard deviation (n - 1)."""
    mean = math.fsum(values) / len(values)
    return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


def heavy_tailed(values: list[float]) -> bool:
    """Whether the sample's skewness or excess kurtosis is past SKEW or KURTOSIS."""
    n = len(values)
    if n < 4:
        return False
    mean = math.fsum(values) / n
    m2 = math.fsum((v - mean) ** 2 for v in values) / n
    if m2 == 0:
        return False
    m3 = math.fsum((v - mean) ** 3 for v in values) / n
    m4 = math.fsum((v - mean) ** 4 for v in values) / n
    return abs(m3 / m2**1.5) > SKEW or m4 / m2**2 - 3.0 > KURTOSIS


def wilcoxon_p(differences: list[float]) -> float:
    """Two-sided p-value of Wilcoxon's signed-rank test (zero differences dropped)."""
    values = [d for d in differences if d != 0.0]
    n = len(values)
    if n == 0:
        return 1.0
    order = sorted(range(n), key=lambda i: abs(values[i]))
    ranks, ties, position = [0.0] * n, [], 0
    for _, run in itertools.groupby(order, key=lambda i: abs(values[i])):
        members = list(run)
        for i in members:  # ties share the average of their ranks
            ranks[i] = position + (len(members) + 1) / 2.0
        position += len(members)
        ties.append(len(members))
    positive = math.fsum(r for r, v in zip(ranks, values, strict=True) if v > 0)
    statistic = min(positive, n * (n + 1) / 2.0 - positive)
    if n < 26 and all(t == 1 for t in ties):  # exact: count the signs' 2^n outcomes
        counts = [1] + [0] * (n * (n + 1) // 2)
        for rank in range(1, n + 1):
            for total in range(len(counts) - 1, rank - 1, -1):
                counts[total] += counts[total - rank]
        tail = sum(counts[: int(statistic) + 1]) / 2.0**n
        return min(1.0, 2.0 * tail)
    mean = n * (n + 1) / 4.0
    variance = n * (n + 1) * (2 * n + 1) / 24.0 - sum(t**3 - t for t in ties) / 48.0
    if variance <= 0:
        return 1.0
    z = (statistic - mean) / math.sqrt(variance)
    return math.erfc(abs(z) / math.sqrt(2.0))


@dataclass
class Paired:
    """A paired comparison: the mean difference of ``n`` pairs (seeds or tasks)."""

    n: int
    difference: float
    ci95: float | None  # the half-width of its t interval (None for one pair)
    t_p: float | None  # the paired t-test's two-sided p-value
    wilcoxon_p: float | None  # the signed-rank test's
    heavy_tailed: bool  # then Wilcoxon's p decides

    @property
    def p(self) -> float | None:
        """The p-value that decides: Wilcoxon's for heavy-tailed differences, else t's."""
        return self.wilcoxon_p if self.heavy_tailed else self.t_p


def paired(differences: list[float]) -> Paired:
    """Mean, 95% t interval and p-values of paired ``differences`` (one per pair)."""
    n = len(differences)
    mean, half = mean_ci(differences)
    if n < 2:
        return Paired(n, mean, None, None, None, False)
    spread = sd(differences)
    if spread == 0.0:
        t_p = 1.0 if mean == 0.0 else 0.0
    else:
        t_p = t_two_sided_p(mean / (spread / math.sqrt(n)), n - 1)
    return Paired(n, mean, half, t_p, wilcoxon_p(differences), heavy_tailed(differences))
