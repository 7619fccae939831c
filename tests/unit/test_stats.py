"""tulip.stats against textbook numbers: the Wilson interval, the t interval of a mean, the exact McNemar
test, Holm's adjustment; the paired bootstrap against what it must give on arrays whose answer is known."""
import math

import numpy as np
import scipy.stats
import pytest

from tulip.stats import error_interval, holm, mcnemar_exact, paired_bootstrap, seed_interval


@pytest.mark.parametrize("errors, n, low, high", [(17, 100, 10.89, 25.55), (44, 100, 34.67, 53.77)])
def test_wilson_interval_of_an_error_rate(errors, n, low, high):
    assert error_interval(errors, n) == pytest.approx((low, high), abs=0.01)


def test_wilson_interval_stays_inside_0_and_100():
    low, high = error_interval(0, 50)
    assert low == 0 and 0 < high < 10  # the normal approximation would give [0, 0]
    assert all(math.isnan(v) for v in error_interval(0, 0))


def test_t_interval_of_the_mean_over_seeds():
    # 2 ± t(0.975, 2 degrees of freedom) · s/√n = 2 ± 4.3027 · 1/√3
    summary = seed_interval([1, 2, 3])
    assert (summary.mean, summary.n) == (2.0, 3)
    assert (summary.low, summary.high) == pytest.approx((2 - 4.302653 / math.sqrt(3), 2 + 4.302653 / math.sqrt(3)),
                                                        abs=1e-5)
    assert (summary.low, summary.high) == pytest.approx((-0.484, 4.484), abs=1e-3)
    assert seed_interval([2.5, 2.5, 2.5])[2:] == (2.5, 2.5)  # no spread between seeds


def test_one_seed_gives_no_interval_and_nan_spoils_everything():
    one = seed_interval([3.0])
    assert (one.mean, one.n) == (3.0, 1) and math.isnan(one.low) and math.isnan(one.high)
    spoiled = seed_interval([1.0, float("nan"), 3.0])
    assert spoiled.n == 3 and all(math.isnan(v) for v in (spoiled.mean, spoiled.low, spoiled.high))


def test_exact_mcnemar_on_a_classic_table():
    # 1 image only A gets wrong, 9 only B: two-sided p = 2 · P(X ≤ 1 | n=10, 1/2) = 2 · 11/1024
    wrong_a = np.array([True] * 1 + [False] * 9 + [True] * 5 + [False] * 20)
    wrong_b = np.array([False] * 1 + [True] * 9 + [True] * 5 + [False] * 20)
    assert mcnemar_exact(wrong_a, wrong_b) == (1, 9, pytest.approx(22 / 1024, rel=1e-12))
    assert mcnemar_exact(wrong_b, wrong_a) == (9, 1, pytest.approx(0.02148, abs=1e-5))
    assert mcnemar_exact(wrong_a, wrong_a) == (0, 0, 1.0)  # no discordant image
    with pytest.raises(ValueError):
        mcnemar_exact(wrong_a, wrong_b[:-1])


def test_bootstrap_of_identical_results_is_exactly_zero():
    wrong = np.random.default_rng(1).random((3, 500)) < 0.2
    assert paired_bootstrap(wrong, wrong.copy()) == (0.0, 0.0, 0.0)


def test_bootstrap_of_a_large_difference_excludes_zero():
    rng = np.random.default_rng(2)
    wrong_a, wrong_b = rng.random((3, 1000)) < 0.30, rng.random((3, 1000)) < 0.10
    effect, low, high = paired_bootstrap(wrong_a, wrong_b, resamples=2000)
    assert effect == pytest.approx(100 * (wrong_b.mean() - wrong_a.mean()), abs=1e-12)
    assert low < effect < high < 0
    assert high - low < 10  # ~20 points apart, 3000 paired (seed, image) results: a narrow interval



def test_bootstrap_interval_has_the_width_of_a_95_percent_interval():
    """One seed, 2000 images, A wrong on 400 of them that B gets right: the paired differences have
    mean −0.2 and variance 0.16, so the 95 % interval is close to −20 ± 1.96·√(0.16/2000)·100 points
    (±1.753); a 90 % interval would be ±1.47."""
    wrong_a = np.zeros(2000, dtype=bool)
    wrong_a[:400] = True
    effect, low, high = paired_bootstrap(wrong_a, np.zeros(2000, dtype=bool))
    assert effect == -20.0
    half_width = 1.959964 * math.sqrt(0.16 / 2000) * 100
    assert (effect - low, high - effect) == pytest.approx((half_width, half_width), abs=0.12)

def test_bootstrap_is_reproducible_and_seeded():
    rng = np.random.default_rng(3)
    wrong_a, wrong_b = rng.random((2, 400)) < 0.25, rng.random((2, 400)) < 0.22
    first = paired_bootstrap(wrong_a, wrong_b, resamples=1000, seed=7)
    assert paired_bootstrap(wrong_a, wrong_b, resamples=1000, seed=7) == first
    assert paired_bootstrap(wrong_a, wrong_b, resamples=1000, seed=8) != first


def test_bootstrap_resamples_the_seeds_too():
    """Two seeds that disagree (B better by 20 points under one, worse by 20 under the other) on images
    that all agree within a seed: resampling images alone would see no spread at all; resampling the
    seeds spans both."""
    wrong_a = np.zeros((2, 200), dtype=bool)
    wrong_b = np.zeros((2, 200), dtype=bool)
    wrong_a[0, :40] = True  # seed 0: A wrong on 40 images, B on none → −20 points
    wrong_b[1, :40] = True  # seed 1: B wrong on 40, A on none → +20 points
    effect, low, high = paired_bootstrap(wrong_a, wrong_b, resamples=2000)
    assert effect == 0.0
    assert low < -15 and high > 15
    # One seed: only the images are resampled, around that seed's −20 points.
    effect, low, high = paired_bootstrap(wrong_a[0], wrong_b[0], resamples=2000)
    assert effect == -20.0 and -27 < low < -20 < high < -13


def test_holm_on_a_textbook_example():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02], abs=1e-12)
    # capped at 1, monotone in the order of the raw p-values, NaN left out of the count
    assert holm([0.5, 0.4, 0.01]) == pytest.approx([0.8, 0.8, 0.03], abs=1e-12)
    assert holm([0.9, 0.8]) == [1.0, 1.0]  # 2 · 0.8 capped at 1, and 0.9 may not fall below it
    adjusted = holm([0.02, float("nan"), 0.04])
    assert adjusted[0] == pytest.approx(0.04) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.04)
    assert holm([]) == []


def test_paired_ratio_is_the_geometric_mean_ratio_with_a_t_interval_on_the_logs():
    from tulip.stats import paired_ratio
    a = np.array([1.0, 2.0, 4.0])
    log_ratios = np.array([0.1, 0.2, 0.3])  # mean 0.2, sample std 0.1: t(0.975, 2) = 4.3027
    ratio, low, high, p = paired_ratio(a, a * np.exp(log_ratios))
    half_width = 4.302652729911275 * 0.1 / np.sqrt(3)
    assert ratio == pytest.approx(np.exp(0.2))
    assert (low, high) == pytest.approx((np.exp(0.2 - half_width), np.exp(0.2 + half_width)))
    assert p == pytest.approx(2 * scipy.stats.t.sf(0.2 / (0.1 / np.sqrt(3)), 2))
    # an exact ratio has no spread to test; one pair or a non-positive figure gives nothing
    assert paired_ratio(a, 2 * a)[:3] == pytest.approx((2.0, 2.0, 2.0)) and np.isnan(paired_ratio(a, 2 * a)[3])
    assert all(np.isnan(paired_ratio([1.0], [2.0])))
    assert all(np.isnan(paired_ratio([1.0, 0.0], [2.0, 1.0])))
