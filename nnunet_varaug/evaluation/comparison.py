"""Is trainer B better than trainer A beyond seed noise? The statistics of ``compare``, on (cases x replicas) tables.

Each trainer gives one table per structure: ``Y[i, k]``, the Dice (or any score) of replica ``k`` on case ``i``;
both trainers are evaluated on the same ``n`` cases, their replicas are independent trainings (replica ``k`` of A
has nothing to do with replica ``k`` of B). The model (docs/compare.md)::

    Y_t[i, k] = mu_t + c_i + g_t[i] + r_t[k] + e_t[i, k]

``c_i`` the case's difficulty (shared, cancels in the difference), ``g_t[i]`` how much the case suits trainer
``t`` (case x trainer), ``r_t[k]`` the seed of replica ``k`` (variance ``sigma2_r,t``, per trainer), ``e_t[i, k]``
the rest (variance ``sigma2_e,t``); all random. For ``Delta = mean(Y_B) - mean(Y_A)``::

    Var(Delta_hat) = sigma2_d / n + sum_t sigma2_e,t / (n K_t) + sum_t sigma2_r,t / K_t

(``sigma2_d`` the variance of ``g_B - g_A``). Its unbiased ANOVA estimate is a linear combination of independent
mean squares: the variance over cases of the replica-averaged differences ``S2_d`` and, per trainer, the two-way
ANOVA's between-replica and residual mean squares::

    V = S2_d / n + sum_t (MS_rep,t - MS_res,t) / (n K_t)

with the replica part truncated at zero, and the interval ``Delta_hat +- t(0.975, nu) sqrt(V)`` with
Satterthwaite's (1946) degrees of freedom ``nu`` for a linear combination of mean squares. Its calibration is
checked by simulation (tests/evaluation/test_comparison.py, docs/compare.md): it holds from K = 3 replicas per
trainer, hence :data:`MIN_REPLICAS`. Every function takes tables with any leading batch dimensions, so that
simulations run vectorized. Wilcoxon, permutation and seed-noise-ratio tests: :mod:`.significance`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

LEVEL = 0.95
"""The confidence level of every interval."""

MIN_REPLICAS = 3
"""Below this many replicas per trainer, ``compare`` gives numbers but no verdict (:data:`MIN_REPLICAS_REASON`)."""

MIN_REPLICAS_REASON = (
    "with 2 replicas per trainer, each trainer's seed noise is estimated from 1 degree of freedom and the "
    "interval is too narrow when the two trainers' seed noise differs: in simulation (docs/compare.md) the 95 % "
    "interval excluded a true difference of zero in up to 11.8 % of the comparisons instead of 5 %")

MAX_REPLICAS = 1000
"""The largest number of replicas :func:`replicas_needed` looks at; beyond it, more cases are needed instead."""


@dataclass(frozen=True)
class MeanSquares:
    """The two-way ANOVA (cases x replicas, one value per cell) of one trainer's table."""

    n: int                   # cases
    k: int                   # replicas
    replica: np.ndarray      # between-replica mean square, k - 1 degrees of freedom
    residual: np.ndarray     # case x replica mean square, (n - 1)(k - 1) degrees of freedom

    @property
    def replica_var(self) -> np.ndarray:
        """``sigma2_r``: the variance of the seed's effect on a case's score, truncated at 0."""
        return np.maximum(0.0, (self.replica - self.residual) / self.n)

    @property
    def residual_var(self) -> np.ndarray:
        """``sigma2_e``: the variance of a (case, replica) cell around its case's and replica's effects."""
        return self.residual

    @property
    def seed_noise(self) -> np.ndarray:
        """The standard deviation over replicas of one training's mean score on these cases
        (``sqrt(MS_rep / n)``, the same as the ddof-1 standard deviation of the replicas' means)."""
        return np.sqrt(self.replica / self.n)


def mean_squares(table: np.ndarray) -> MeanSquares:
    """The between-replica and residual mean squares of ``(..., n, k)`` tables (n >= 2, k >= 2)."""
    y = np.asarray(table, dtype=np.float64)
    n, k = y.shape[-2:]
    case_means, replica_means = y.mean(-1), y.mean(-2)
    grand = y.mean((-2, -1))
    residual = y - case_means[..., :, None] - replica_means[..., None, :] + grand[..., None, None]
    return MeanSquares(n, k, n * replica_means.var(-1, ddof=1),
                       (residual ** 2).sum((-2, -1)) / ((n - 1) * (k - 1)))


def satterthwaite(terms) -> np.ndarray:
    """Degrees of freedom of ``sum_j a_j`` where each ``a_j`` is a multiple of a mean square with ``df_j``
    degrees of freedom: ``(sum_j a_j)^2 / sum_j (a_j^2 / df_j)`` (Satterthwaite 1946). ``terms``: ``(a_j, df_j)``;
    a term whose coefficient is negative enters the denominator squared, as in the formula."""
    total = sum(a for a, _ in terms)
    denominator = sum(np.square(a) / df for a, df in terms)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, np.square(total) / denominator, np.inf)


@dataclass(frozen=True)
class Interval:
    """``Delta = mean(B) - mean(A)`` and its interval; arrays of the tables' batch shape."""

    delta: np.ndarray
    variance: np.ndarray     # V, the estimated variance of delta
    df: np.ndarray           # Satterthwaite's degrees of freedom
    low: np.ndarray
    high: np.ndarray
    case_spread: np.ndarray  # S2_d: variance over cases of the replica-averaged differences
    a: MeanSquares
    b: MeanSquares
    level: float

    @property
    def halfwidth(self) -> np.ndarray:
        return (self.high - self.low) / 2

    @property
    def excludes_zero(self) -> np.ndarray:
        return (self.low > 0) | (self.high < 0)

    @property
    def case_var(self) -> np.ndarray:
        """``sigma2_d``: the variance over cases of the true difference ``g_B - g_A`` (truncated at 0)."""
        return np.maximum(0.0, self.case_spread - self.a.residual / self.a.k - self.b.residual / self.b.k)


def variance_terms(n: int, case_spread, a: MeanSquares, b: MeanSquares) -> Tuple[np.ndarray, list]:
    """``V`` and its Satterthwaite terms ``(coefficient x mean square, df)``. The replica part
    ``sum_t (MS_rep,t - MS_res,t) / (n K_t)`` is left out (0, and no terms) where it is negative."""
    replica_part = sum((m.replica - m.residual) / (n * m.k) for m in (a, b))
    keep = replica_part > 0
    terms = [(case_spread / n, n - 1)]
    for m in (a, b):
        terms.append((np.where(keep, m.replica / (n * m.k), 0.0), m.k - 1))
        terms.append((np.where(keep, -m.residual / (n * m.k), 0.0), (n - 1) * (m.k - 1)))
    return case_spread / n + np.where(keep, replica_part, 0.0), terms


def delta_interval(a: np.ndarray, b: np.ndarray, level: float = LEVEL) -> Interval:
    """``Delta = mean(B) - mean(A)`` with its ``level`` interval, cases and replicas both random.

    Args:
        a, b: ``(..., n, K_a)`` and ``(..., n, K_b)`` tables: the same n cases (rows) in both, K >= 2, n >= 2,
            no NaN (:func:`complete_cases`).
        level: the confidence level.
    """
    from scipy import stats

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape[-2] != b.shape[-2] or a.shape[-2] < 2 or min(a.shape[-1], b.shape[-1]) < 2:
        raise ValueError(f"tables of shapes {a.shape} and {b.shape}: both need the same n >= 2 cases (rows) and "
                         f"at least 2 replicas (columns)")
    n = a.shape[-2]
    d = b.mean(-1) - a.mean(-1)
    delta, case_spread = d.mean(-1), d.var(-1, ddof=1)
    ms_a, ms_b = mean_squares(a), mean_squares(b)
    variance, terms = variance_terms(n, case_spread, ms_a, ms_b)
    df = satterthwaite(terms)
    with np.errstate(invalid="ignore"):
        half = np.where(variance > 0, stats.t.ppf(0.5 + level / 2, df) * np.sqrt(variance), 0.0)
    return Interval(delta, variance, df, delta - half, delta + half, case_spread, ms_a, ms_b, level)


def complete_cases(*tables: np.ndarray) -> np.ndarray:
    """Rows (cases) without NaN in any of the ``(n, K)`` tables: the cases a comparison can use. nnU-Net's Dice is
    NaN where prediction and ground truth are both empty; a case with such a cell in any replica of any trainer
    is left out of that structure's comparison, so that every table stays complete (cases x replicas)."""
    return np.logical_and.reduce([~np.isnan(np.asarray(t, dtype=np.float64)).any(-1) for t in tables])


# ---- seed noise and flips -----------------------------------------------------------------------------------
def replica_means(table: np.ndarray) -> np.ndarray:
    """Each replica's mean over the cases: ``(..., n, K)`` -> ``(..., K)``."""
    return np.asarray(table, dtype=np.float64).mean(-2)


def seed_noise(table: np.ndarray) -> np.ndarray:
    """The standard deviation (ddof 1) over replicas of one training's mean score on these cases."""
    return replica_means(table).std(-1, ddof=1)


@dataclass(frozen=True)
class Flips:
    """How often one training of A and one of B rank the trainers the other way round from the K-replica means."""

    probability: float  # flips / pairs; NaN when the K-replica means are equal (no direction to flip)
    flips: float        # pairs ranked the other way round (a tie counts 1/2)
    pairs: int          # K_a x K_b


def flip_probability(a: np.ndarray, b: np.ndarray) -> Flips:
    """Over all ``K_a x K_b`` pairs (replica of A, replica of B), the fraction whose two mean scores are ordered
    against ``Delta_hat``'s sign; an exact tie between the two replicas counts one half."""
    ma, mb = replica_means(a), replica_means(b)
    direction = np.sign(mb.mean() - ma.mean())
    diff = mb[None, :] - ma[:, None]
    pairs = int(diff.size)
    if direction == 0:
        return Flips(math.nan, math.nan, pairs)
    flips = float(np.count_nonzero(np.sign(diff) == -direction) + 0.5 * np.count_nonzero(diff == 0))
    return Flips(flips / pairs, flips, pairs)


# ---- planning -------------------------------------------------------------------------------------------------
def projected_halfwidth(interval: Interval, k, level: Optional[float] = None) -> np.ndarray:
    """The expected half-width of the interval with ``k`` replicas per trainer (scalar or array) on the same
    number of cases, from the estimated components: each mean square replaced by its expectation at ``k``,
    Satterthwaite's degrees of freedom from those. ``interval`` must be one comparison (no batch dimensions)."""
    from scipy import stats

    level = interval.level if level is None else level
    k = np.asarray(k, dtype=np.float64)
    a, b, n = interval.a, interval.b, interval.a.n
    expect = [MeanSquares(n, k, m.residual + n * m.replica_var, m.residual) for m in (a, b)]
    case_spread = interval.case_var + (a.residual + b.residual) / k
    variance, terms = variance_terms(n, case_spread, *expect)
    df = satterthwaite(terms)
    return np.where(variance > 0, stats.t.ppf(0.5 + level / 2, df) * np.sqrt(variance), 0.0)


def replicas_needed(interval: Interval, halfwidth: float) -> Optional[int]:
    """The smallest K (>= :data:`MIN_REPLICAS`, equal for both trainers) whose projected half-width is below
    ``halfwidth``; None when even :data:`MAX_REPLICAS` replicas do not get there (the case-to-case spread
    dominates: more cases are needed, not more replicas)."""
    if not halfwidth > 0:
        return None
    ks = np.arange(MIN_REPLICAS, MAX_REPLICAS + 1)
    ok = np.flatnonzero(projected_halfwidth(interval, ks) < halfwidth)
    return int(ks[ok[0]]) if ok.size else None


def cases_halfwidth(interval: Interval) -> float:
    """The half-width left with infinitely many replicas: the case-to-case spread of the difference alone."""
    from scipy import stats

    n = interval.a.n
    var = float(interval.case_var) / n
    return float(stats.t.ppf(0.5 + interval.level / 2, n - 1) * math.sqrt(var)) if var > 0 else 0.0


# ---- one comparison -------------------------------------------------------------------------------------------
@dataclass
class Comparison:
    """Everything ``compare`` reports for one pair of trainers and one score (a structure's Dice or volume error).

    ``status``: 'b_better', 'a_better' (the interval excludes zero; "better" follows ``higher_is_better``),
    'unresolved' (it does not), 'too_few_replicas' (K < :data:`MIN_REPLICAS`: numbers, no verdict), 'no_cases'
    (fewer than 2 complete cases).
    """

    n_cases: int
    left_out: int                 # cases left out (NaN in some replica: both empty, nnU-Net's convention)
    k_a: int
    k_b: int
    higher_is_better: bool
    mean_a: float = math.nan
    mean_b: float = math.nan
    interval: Optional[Interval] = None
    seed_noise_a: float = math.nan
    seed_noise_b: float = math.nan
    flips: Optional[Flips] = None
    wilcoxon_statistic: float = math.nan
    wilcoxon_p: float = math.nan
    permutation_p: float = math.nan
    permutation_labelings: int = 0
    permutation_exact: bool = False
    needed_for_effect: Optional[int] = None
    needed_for_target: Optional[int] = None
    target_halfwidth: Optional[float] = None
    cases_only_halfwidth: float = math.nan
    replica_means_a: Optional[np.ndarray] = None  # each replica's mean over the compared cases
    replica_means_b: Optional[np.ndarray] = None
    status: str = "no_cases"

    @property
    def delta(self) -> float:
        return math.nan if self.interval is None else float(self.interval.delta)


def compare(a: np.ndarray, b: np.ndarray, higher_is_better: bool = True, target_halfwidth: Optional[float] = None,
            level: float = LEVEL) -> Comparison:
    """Every number of one comparison of trainer B against trainer A on ``(n, K_a)`` and ``(n, K_b)`` tables (same
    cases in the same rows; rows with NaN are left out, :func:`complete_cases`)."""
    from nnunet_varaug.evaluation import significance

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"tables of shapes {a.shape} and {b.shape}: both must be (cases, replicas) over the same cases")
    keep = complete_cases(a, b)
    a, b = a[keep], b[keep]
    result = Comparison(int(keep.sum()), int((~keep).sum()), a.shape[1], b.shape[1], higher_is_better,
                        target_halfwidth=target_halfwidth)
    if result.n_cases < 2 or min(result.k_a, result.k_b) < 2:
        return result
    result.mean_a, result.mean_b = float(a.mean()), float(b.mean())
    result.replica_means_a, result.replica_means_b = replica_means(a), replica_means(b)
    result.interval = iv = delta_interval(a, b, level)
    result.seed_noise_a, result.seed_noise_b = float(seed_noise(a)), float(seed_noise(b))
    result.flips = flip_probability(a, b)
    result.wilcoxon_statistic, result.wilcoxon_p = significance.wilcoxon_over_cases(a, b)
    perm = significance.permutation_test(a, b)
    result.permutation_p, result.permutation_labelings, result.permutation_exact = perm.p, perm.labelings, perm.exact
    result.needed_for_effect = replicas_needed(iv, abs(float(iv.delta)))
    if target_halfwidth is not None:
        result.needed_for_target = replicas_needed(iv, target_halfwidth)
    result.cases_only_halfwidth = cases_halfwidth(iv)
    if min(result.k_a, result.k_b) < MIN_REPLICAS:
        result.status = "too_few_replicas"
    elif bool(iv.excludes_zero):
        result.status = "b_better" if (float(iv.delta) > 0) == higher_is_better else "a_better"
    else:
        result.status = "unresolved"
    return result
