"""The statistics of comparisons: intervals for error rates and seed means, paired tests.

Numbers in, numbers out (no tulip imports): the final evaluation and the report both use it.
Built on scipy.stats wherever it has the formula; the two-level bootstrap and Holm's adjustment, which
it has not, are written here.
"""
import warnings
from typing import NamedTuple

import numpy as np
from scipy import stats as _scipy

CONFIDENCE = 0.95
# The bootstrap draws its image indices in blocks of at most this many, so that 10 000 resamples of a
# 10 000-image test set never hold more than a few MB at once.
_BOOTSTRAP_BLOCK = 2_000_000


def error_interval(errors: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Wilson score interval of an error rate of `errors` in `n` images, in percent.

    Wilson rather than the normal approximation: it stays inside [0, 100] and keeps its coverage at
    error rates near 0 or 100 %, where robust and certified errors often are. 17/100 → 10.9–25.5 %.
    """
    if n <= 0:
        return float("nan"), float("nan")
    low, high = _scipy.binomtest(int(errors), int(n)).proportion_ci(confidence, method="wilson")
    return 100.0 * float(low), 100.0 * float(high)


class SeedSummary(NamedTuple):
    """The mean of a metric over training seeds and the Student-t interval of that mean."""
    mean: float
    n: int  # how many seeds
    low: float  # NaN with fewer than 2 seeds: one seed says nothing about the spread between seeds
    high: float


def seed_interval(values, confidence: float = CONFIDENCE) -> SeedSummary:
    """The mean of `values` (one per seed) with its Student-t interval; [1, 2, 3] → 2, [-0.484, 4.484].

    Any NaN (a run that recorded a non-finite value) makes mean and interval NaN rather than leaving it
    out silently; identical values give the zero-width interval [mean, mean].
    """
    values = np.asarray(values, dtype=float).ravel()
    nan = float("nan")
    if values.size == 0 or np.isnan(values).any():
        return SeedSummary(nan, int(values.size), nan, nan)
    mean = float(values.mean())
    if values.size < 2 or not np.isfinite(values).all():
        return SeedSummary(mean, int(values.size), nan, nan)
    with warnings.catch_warnings():  # identical values: scipy warns of precision loss, and is right anyway
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = _scipy.ttest_1samp(values, 0.0).confidence_interval(confidence)
    return SeedSummary(mean, int(values.size), float(low), float(high))


def mcnemar_exact(wrong_a, wrong_b) -> tuple[int, int, float]:
    """The exact McNemar test of two classifiers on the same images: (only_a, only_b, two-sided p).

    `wrong_a`, `wrong_b` are boolean arrays of one shape, element i the same image (or (seed, image)
    pair). Only the discordant images count: those only A gets wrong and those only B gets wrong; under
    the null hypothesis each of them is equally likely either way, a binomial test at 1/2. No discordant
    image at all: p = 1.
    """
    wrong_a, wrong_b = _paired(wrong_a, wrong_b)
    only_a = int(np.sum(wrong_a & ~wrong_b))
    only_b = int(np.sum(~wrong_a & wrong_b))
    if only_a + only_b == 0:
        return only_a, only_b, 1.0
    return only_a, only_b, float(_scipy.binomtest(only_b, only_a + only_b, 0.5).pvalue)


def paired_bootstrap(wrong_a, wrong_b, resamples: int = 10_000, seed: int = 0,
                     confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """The difference of error rates B − A and its percentile-bootstrap interval, in percentage points.

    `wrong_a`, `wrong_b`: boolean arrays of shape (seeds, images) (or (images,) for one seed); row s of
    both comes from the same training seed, column i is the same image. Each resample draws the images
    with replacement and the seed rows with replacement, the same draws for A and B, so the pairing is
    kept and both sources of variation, which test images and which training seeds, are in the interval.
    With one seed only the images are resampled. Seeded: the same arrays give the same interval.
    """
    wrong_a, wrong_b = _paired(wrong_a, wrong_b)
    if wrong_a.ndim == 1:
        wrong_a, wrong_b = wrong_a[None, :], wrong_b[None, :]
    seeds, images = wrong_a.shape
    nan = float("nan")
    if seeds == 0 or images == 0:
        return nan, nan, nan
    # float32 holds these sums exactly: counts times ±1, at most `images` in size
    difference = wrong_b.astype(np.float32) - wrong_a.astype(np.float32)
    effect = 100.0 * float(difference.mean(dtype=np.float64))
    rng = np.random.default_rng(seed)
    block = max(1, _BOOTSTRAP_BLOCK // images)
    resampled = np.empty(resamples)
    for start in range(0, resamples, block):
        size = min(block, resamples - start)
        drawn = rng.integers(0, images, size=(size, images))
        # How often each image was drawn in each resample: the resample's mean is then one product.
        offsets = (drawn + images * np.arange(size)[:, None]).ravel()
        counts = np.bincount(offsets, minlength=size * images).reshape(size, images).astype(np.float32)
        per_seed = (counts @ difference.T).astype(np.float64) / images  # (size, seeds)
        if seeds > 1:
            rows = rng.integers(0, seeds, size=(size, seeds))
            per_seed = np.take_along_axis(per_seed, rows, axis=1)
        resampled[start:start + size] = per_seed.mean(axis=1)
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(resampled, [tail, 100.0 - tail])
    return effect, 100.0 * float(low), 100.0 * float(high)


def paired_ratio(values_a, values_b, confidence: float = CONFIDENCE) -> tuple[float, float, float, float]:
    """(ratio, low, high, p): how many times B's positive figure is A's, paired by seed.

    A Student-t test on the paired differences of the logarithms (scipy.stats.ttest_1samp): the ratio is
    the geometric mean of B/A over the pairs, its interval the t interval of the mean log ratio taken back
    with exp, p the two-sided p-value of "B/A = 1". For figures that vary by factors, such as Lipschitz
    constants, whose spread grows with their size. Fewer than 2 pairs, or a figure ≤ 0: all NaN.
    """
    a, b = np.asarray(values_a, dtype=float), np.asarray(values_b, dtype=float)
    if a.shape != b.shape or a.size < 2 or not (np.all(a > 0) and np.all(b > 0)):
        return (float("nan"),) * 4
    log_ratios = np.log(b) - np.log(a)
    if np.ptp(log_ratios) < 1e-12:  # no spread but rounding: the ratio is exact, the t test undefined
        ratio = float(np.exp(log_ratios.mean()))
        return ratio, ratio, ratio, float("nan")
    test = _scipy.ttest_1samp(log_ratios, 0.0)
    low, high = test.confidence_interval(confidence)
    return float(np.exp(log_ratios.mean())), float(np.exp(low)), float(np.exp(high)), float(test.pvalue)


def holm(p_values) -> list[float]:
    """Holm–Bonferroni adjusted p-values, in the order given: [0.01, 0.04, 0.03, 0.005] →
    [0.03, 0.06, 0.06, 0.02].

    Step-down: the k-th smallest of m p-values is multiplied by m − k + 1, each adjusted value is at
    least the one before it in that order, and none exceeds 1. Rejecting where the adjusted value is
    below α keeps the chance of any false rejection among all m tests below α. NaN stays NaN and does
    not count among the m.
    """
    p = np.asarray(p_values, dtype=float).ravel()
    adjusted = np.full(p.shape, np.nan)
    tested = np.flatnonzero(~np.isnan(p))
    order = tested[np.argsort(p[tested], kind="stable")]
    m = len(order)
    running = 0.0
    for rank, position in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[position]))
        adjusted[position] = running
    return [float(value) for value in adjusted]


def _paired(wrong_a, wrong_b) -> tuple[np.ndarray, np.ndarray]:
    wrong_a, wrong_b = np.asarray(wrong_a, dtype=bool), np.asarray(wrong_b, dtype=bool)
    if wrong_a.shape != wrong_b.shape:
        raise ValueError(f"paired arrays must have one shape, got {wrong_a.shape} and {wrong_b.shape}")
    return wrong_a, wrong_b
