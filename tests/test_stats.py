"""metacli.stats against scipy.stats: Student's t, the paired t-test, Wilcoxon's
signed-rank test (exact and normal approximation, ties, zeros), the t intervals."""

from __future__ import annotations

import math
import random

import pytest

from metacli import stats

scipy_stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize("df", [1, 2, 3, 4, 9, 29, 30, 120, 599])
def test_t_quantiles_and_p_values_are_scipys(df: int) -> None:
    assert stats.t_quantile(0.975, df) == pytest.approx(scipy_stats.t.ppf(0.975, df), rel=1e-9)
    for t in (0.0, 0.3, 1.0, 2.1, 5.0, 40.0):
        expected = 2 * scipy_stats.t.sf(t, df)
        assert stats.t_two_sided_p(t, df) == pytest.approx(expected, rel=1e-9, abs=1e-300)
        assert stats.t_two_sided_p(-t, df) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_mean_and_its_interval() -> None:
    values = [0.62, 0.71, 0.58, 0.66]
    mean, half = stats.mean_ci(values)
    low, high = scipy_stats.t.interval(
        0.95, len(values) - 1, loc=mean, scale=scipy_stats.sem(values)
    )
    assert mean == pytest.approx(sum(values) / 4) and half == pytest.approx((high - low) / 2)
    assert stats.mean_ci([0.5]) == (0.5, None)


def samples() -> list[list[float]]:
    rng = random.Random(0)
    normal = [rng.gauss(0.02, 0.1) for _ in range(40)]
    heavy = [rng.gauss(0.0, 0.05) for _ in range(45)] + [3.0, -2.5, 4.0, 2.0, 5.5]
    small = [0.3, -0.1, 0.25, 0.4, 0.05, 0.2, -0.05]
    tied = [0.1, 0.1, -0.1, 0.2, 0.0, 0.3, 0.1, -0.2, 0.0, 0.2, 0.3, 0.1] * 3
    seeds = [0.021, 0.034, 0.009]
    return [normal, heavy, small, tied, seeds]


@pytest.mark.parametrize("index", range(5))
def test_paired_tests_are_scipys(index: int) -> None:
    differences = samples()[index]
    ours = stats.paired(differences)
    t_test = scipy_stats.ttest_1samp(differences, 0.0)
    assert ours.t_p == pytest.approx(t_test.pvalue, rel=1e-9)
    nonzero = [d for d in differences if d != 0]
    exact = len(nonzero) < 26 and len({abs(d) for d in nonzero}) == len(nonzero)
    method = "exact" if exact else "approx"
    wilcoxon = scipy_stats.wilcoxon(differences, method=method, correction=False)
    assert ours.wilcoxon_p == pytest.approx(wilcoxon.pvalue, rel=1e-9)
    low, high = scipy_stats.t.interval(
        0.95, len(differences) - 1, loc=ours.difference, scale=scipy_stats.sem(differences)
    )
    assert ours.ci95 == pytest.approx((high - low) / 2, rel=1e-9)


def test_heavy_tails_hand_the_decision_to_wilcoxon() -> None:
    normal, heavy = samples()[0], samples()[1]
    assert not stats.heavy_tailed(normal) and stats.heavy_tailed(heavy)
    decided = stats.paired(heavy)
    assert decided.p == decided.wilcoxon_p != decided.t_p
    assert stats.paired(normal).p == stats.paired(normal).t_p


def test_degenerate_samples() -> None:
    one = stats.paired([0.2])
    assert one.n == 1 and one.ci95 is None and one.p is None
    same = stats.paired([0.1, 0.1, 0.1])
    assert same.t_p is not None and same.t_p < 1e-20 and same.difference == pytest.approx(0.1)
    zero = stats.paired([0.0, 0.0])
    assert zero.t_p == 1.0 and zero.wilcoxon_p == 1.0
    assert math.isnan(stats.t_two_sided_p(math.nan, 3))
