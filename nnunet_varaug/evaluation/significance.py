"""The tests beside ``compare``'s interval: Wilcoxon over cases, the permutation test over replica labels, and the
interval for the ratio of two trainers' seed noise. Tables are ``(n cases, K replicas)`` as in :mod:`.comparison`.

* **Wilcoxon signed-rank** over the cases of the replica-averaged differences ``mean_k Y_B[i, k] - mean_k
  Y_A[i, k]``, exactly ``scipy.stats.wilcoxon`` with its defaults. It treats the K trainings of each trainer as
  fixed: it asks whether *these* trainings of B beat *these* of A across cases, not whether new trainings would.
* **Permutation over replica labels**: if A and B were the same training procedure, their ``K_a + K_b``
  trainings would be exchangeable; every way of calling ``K_b`` of them "B" is equally likely. The statistic is
  the difference of the mean scores; the two-sided p-value the fraction of labelings at least as extreme as the
  observed one (the observed labeling included). Exact (all ``C(K_a + K_b, K_b)`` labelings, 20 for K = 3) up
  to :data:`EXACT_LIMIT` labelings, else a fixed-seed random sample. With K = 3 each, no p-value is below
  2/20 = 0.1: three replicas cannot make this test significant at 5 %.
* **Seed-noise ratio**: each trainer's replica means have variance ``sigma2 = sigma2_r + sigma2_e / n``; the
  ratio of their sample variances over ``sigma_B^2 / sigma_A^2`` follows F(K_b - 1, K_a - 1) under normality,
  which gives the interval (for the ratio of standard deviations, its square root).
"""
from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass
from typing import Tuple

import numpy as np

EXACT_LIMIT = 200_000
"""Enumerate every labeling up to this many (K = 10 each: 184 756); beyond, :data:`RANDOM_LABELINGS` random ones."""

RANDOM_LABELINGS = 20_000


def wilcoxon_over_cases(a: np.ndarray, b: np.ndarray) -> Tuple[float, float]:
    """``scipy.stats.wilcoxon`` (default settings) of the per-case differences of the replica-averaged scores;
    ``(statistic, p)``. NaN when every difference is zero."""
    from scipy import stats

    d = np.asarray(b, dtype=np.float64).mean(-1) - np.asarray(a, dtype=np.float64).mean(-1)
    if not np.any(d != 0):
        return math.nan, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns about ties and small samples; its result stands
        result = stats.wilcoxon(d)
    return float(result.statistic), float(result.pvalue)


@dataclass(frozen=True)
class Permutation:
    p: float
    labelings: int   # how many labelings the p-value counts over
    exact: bool      # all of them (True) or a random sample


def labeling_statistics(a: np.ndarray, b: np.ndarray, limit: int = EXACT_LIMIT,
                        draws: int = RANDOM_LABELINGS, seed: int = 0) -> Tuple[np.ndarray, float, bool]:
    """``(statistics of the labelings, observed statistic, exact)``: ``mean(B) - mean(A)`` for every choice of
    ``K_b`` of the ``K_a + K_b`` replicas as "B" (cases fixed), or for ``draws`` random choices."""
    means = np.concatenate([np.asarray(a, dtype=np.float64).mean(0), np.asarray(b, dtype=np.float64).mean(0)])
    k_a, k_b = np.asarray(a).shape[1], np.asarray(b).shape[1]
    total = means.sum()
    observed = means[k_a:].mean() - means[:k_a].mean()
    exact = math.comb(k_a + k_b, k_b) <= limit
    if exact:
        chosen = np.array(list(itertools.combinations(range(k_a + k_b), k_b)), dtype=np.intp)
    else:
        rng = np.random.default_rng(seed)
        chosen = np.argsort(rng.random((draws, k_a + k_b)), axis=1)[:, :k_b]
    sums = means[chosen].sum(1)
    return sums / k_b - (total - sums) / k_a, float(observed), exact


def permutation_test(a: np.ndarray, b: np.ndarray, limit: int = EXACT_LIMIT, draws: int = RANDOM_LABELINGS,
                     seed: int = 0) -> Permutation:
    """Two-sided permutation test of "A and B are the same training procedure" over replica labels."""
    stats_, observed, exact = labeling_statistics(a, b, limit, draws, seed)
    tolerance = 1e-12 * max(1.0, float(np.max(np.abs(stats_))))
    extreme = int(np.count_nonzero(np.abs(stats_) >= abs(observed) - tolerance))
    if exact:
        return Permutation(extreme / stats_.size, int(stats_.size), True)
    return Permutation((extreme + 1) / (stats_.size + 1), int(stats_.size), False)  # the observed one counted


@dataclass(frozen=True)
class NoiseRatio:
    """Seed noise of B over seed noise of A (standard deviations of one training's mean score) and its interval."""

    ratio: float
    low: float
    high: float
    level: float


def seed_noise_ratio(means_a: np.ndarray, means_b: np.ndarray, level: float = 0.95) -> NoiseRatio:
    """The ratio ``sd(means_b) / sd(means_a)`` (ddof 1) of the replicas' mean scores with its F-based interval:
    ``[sqrt(F_obs / F(1-a/2; K_b-1, K_a-1)), sqrt(F_obs / F(a/2; K_b-1, K_a-1))]``, ``F_obs`` the variance
    ratio. Works with leading batch dimensions. NaN where A's seed noise is zero."""
    from scipy import stats

    means_a, means_b = np.asarray(means_a, dtype=np.float64), np.asarray(means_b, dtype=np.float64)
    k_a, k_b = means_a.shape[-1], means_b.shape[-1]
    if min(k_a, k_b) < 2:
        raise ValueError(f"the seed-noise ratio needs at least 2 replicas of each trainer, got {k_a} and {k_b}")
    var_a, var_b = means_a.var(-1, ddof=1), means_b.var(-1, ddof=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        f = np.where(var_a > 0, var_b / var_a, np.nan)
    alpha = 1 - level
    low = np.sqrt(f / stats.f.ppf(1 - alpha / 2, k_b - 1, k_a - 1))
    high = np.sqrt(f / stats.f.ppf(alpha / 2, k_b - 1, k_a - 1))
    ratio = np.sqrt(f)
    if ratio.ndim == 0:
        return NoiseRatio(float(ratio), float(low), float(high), level)
    return NoiseRatio(ratio, low, high, level)
