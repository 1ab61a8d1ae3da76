"""``compare``'s statistics against simulations with known truth, scipy, and direct counts (plain numpy, no nnU-Net).

The simulated tables follow the model of docs/compare.md: ``Y_t[i, k] = mu_t + c_i + g_t[i] + r_t[k] + e_t[i, k]``
with a case effect shared by both trainers, a case x trainer effect, a seed effect per replica and a residual,
all normal with known variances. Each simulation draws hundreds of comparisons at once (leading batch axis).
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats

from nnunet_varaug.evaluation import comparison, significance
from nnunet_varaug.evaluation.comparison import MeanSquares

pytestmark = pytest.mark.unit

# standard deviations of a realistic setting (Dice around 0.8): cases differ most, the case x trainer effect and
# the residual are a few Dice points, a training's seed moves every case of that replica by about one point
CASE, CASE_TRAINER, SEED, RESIDUAL = 0.08, 0.02, 0.01, 0.02


def simulate(rng, comparisons: int, cases: int, k: int, delta: float = 0.0, case=CASE, case_trainer=CASE_TRAINER,
             seed_a=SEED, seed_b=None, residual=RESIDUAL, k_b=None):
    """``comparisons`` pairs of tables ``(comparisons, cases, k)``: trainer B's true mean is ``delta`` above A's."""
    seed_b = seed_a if seed_b is None else seed_b
    k_b = k if k_b is None else k_b
    shared = rng.normal(0, case, (comparisons, cases, 1))
    tables = []
    for mean, sd_seed, kk in ((0.8, seed_a, k), (0.8 + delta, seed_b, k_b)):
        tables.append(mean + shared + rng.normal(0, case_trainer, (comparisons, cases, 1))
                      + rng.normal(0, sd_seed, (comparisons, 1, kk)) + rng.normal(0, residual, (comparisons, cases, kk)))
    return tables


def false_exclusion(rng, comparisons, k, **kw) -> float:
    a, b = simulate(rng, comparisons, 20, k, 0.0, **kw)
    return float(comparison.delta_interval(a, b).excludes_zero.mean())


@pytest.mark.parametrize("k", [3, 5, 10])
def test_interval_excludes_a_zero_difference_in_five_percent(k):
    """400 simulated comparisons of 20 cases with no true difference: the 95 % interval excludes zero in
    5 % +- 2.5 % of them (replicas and cases both random)."""
    rate = false_exclusion(np.random.default_rng(100 + k), 400, k)
    assert 0.025 <= rate <= 0.075, rate


@pytest.mark.parametrize("k", [3, 5, 10])
def test_interval_excludes_zero_when_the_difference_is_large(k):
    """A difference of 5 Dice points (several standard errors at K = 3): excluded in at least 95 % of 400
    comparisons, always on the right side, and the interval covers the true difference about 95 % of the time."""
    a, b = simulate(np.random.default_rng(200 + k), 400, 20, k, delta=0.05)
    iv = comparison.delta_interval(a, b)
    assert iv.excludes_zero.mean() >= 0.95
    assert not np.any(iv.high < 0)
    covered = ((iv.low <= 0.05) & (0.05 <= iv.high)).mean()
    assert 0.925 <= covered <= 0.975, covered


def test_unequal_seed_noise_is_why_k2_is_refused():
    """One trainer's seed noise 30x the other's: at K = 2 the interval excludes a zero difference far more often
    than 5 % + 2.5 %, at K = 3 it does not; compare gives no verdict below K = 3 and says why."""
    kw = dict(seed_a=0.002, seed_b=0.06, case_trainer=0.01, residual=0.01)
    at_2 = false_exclusion(np.random.default_rng(7), 10_000, 2, **kw)
    at_3 = false_exclusion(np.random.default_rng(8), 10_000, 3, **kw)
    assert at_2 > 0.075 and 0.025 <= at_3 <= 0.075, (at_2, at_3)
    assert comparison.MIN_REPLICAS == 3
    a, b = simulate(np.random.default_rng(9), 1, 20, 2, delta=0.2)
    result = comparison.compare(a[0], b[0])
    assert result.status == "too_few_replicas" and bool(result.interval.excludes_zero)  # numbers, no verdict
    assert "2 replicas" in comparison.MIN_REPLICAS_REASON


def test_variance_components_match_the_truth():
    """Averaged over 2000 simulated 20 x 3 tables, the ANOVA estimates of the seed, residual and case x trainer
    variances are within 20 % of the truth (unbiased: the estimates before truncation at zero are averaged)."""
    a, b = simulate(np.random.default_rng(1), 2000, 20, 3)
    ms = comparison.mean_squares(a)
    assert np.mean((ms.replica - ms.residual) / ms.n) == pytest.approx(SEED ** 2, rel=0.2)
    assert np.mean(ms.residual) == pytest.approx(RESIDUAL ** 2, rel=0.2)
    iv = comparison.delta_interval(a, b)
    case_var = iv.case_spread - iv.a.residual / 3 - iv.b.residual / 3
    assert np.mean(case_var) == pytest.approx(2 * CASE_TRAINER ** 2, rel=0.2)  # var(g_B - g_A)
    # the estimated variance of Delta is unbiased for its variance over the simulations
    assert np.mean(iv.variance) == pytest.approx(np.var(iv.delta), rel=0.2)


def test_seed_noise_is_the_sd_of_the_replicas_means():
    rng = np.random.default_rng(2)
    a = rng.normal(0.8, 0.05, (12, 3))
    means = [sum(a[i, k] for i in range(12)) / 12 for k in range(3)]
    expected = (sum((m - sum(means) / 3) ** 2 for m in means) / 2) ** 0.5  # ddof 1
    assert comparison.seed_noise(a) == pytest.approx(expected)
    assert float(comparison.mean_squares(a).seed_noise) == pytest.approx(expected)
    result = comparison.compare(a, a + rng.normal(0, 0.01, a.shape))
    assert result.seed_noise_a == pytest.approx(expected)


@pytest.mark.parametrize("k_a, k_b", [(3, 3), (3, 4), (5, 2)])
def test_flip_probability_is_a_count_over_all_replica_pairs(k_a, k_b):
    rng = np.random.default_rng(k_a * 10 + k_b)
    a = rng.normal(0.80, 0.02, (15, k_a))
    b = rng.normal(0.81, 0.02, (15, k_b))
    b[:, 0] = a[:, 0]  # replica 0 of each: an exact tie, counted one half
    direction = np.sign(b.mean() - a.mean())
    flips = 0.0
    for i in range(k_a):
        for j in range(k_b):
            d = b[:, j].mean() - a[:, i].mean()
            flips += 0.5 if d == 0 else float(np.sign(d) == -direction)
    result = comparison.flip_probability(a, b)
    assert result.pairs == k_a * k_b
    assert result.flips == flips and result.probability == pytest.approx(flips / (k_a * k_b))


def test_wilcoxon_is_scipys_on_the_replica_averaged_cases():
    rng = np.random.default_rng(3)
    a, b = rng.normal(0.8, 0.05, (14, 3)), rng.normal(0.82, 0.05, (14, 3))
    d = [sum(b[i]) / 3 - sum(a[i]) / 3 for i in range(14)]
    expected = stats.wilcoxon(d)
    statistic, p = significance.wilcoxon_over_cases(a, b)
    assert statistic == expected.statistic and p == expected.pvalue
    assert comparison.compare(a, b).wilcoxon_p == expected.pvalue


def test_permutation_test_enumerates_every_labeling_for_k3():
    """All C(6, 3) = 20 ways of calling three of the six trainings "B"; the p-value is a direct count over them, and
    with B's three replicas above all of A's it is 2/20 (the labeling and its mirror), never below."""
    rng = np.random.default_rng(4)
    a, b = rng.normal(0.8, 0.02, (10, 3)), rng.normal(0.81, 0.02, (10, 3))
    both = np.concatenate([a, b], axis=1)
    observed = b.mean() - a.mean()
    labelings = list(itertools.combinations(range(6), 3))
    extreme = sum(abs(both[:, list(c)].mean() - both[:, [j for j in range(6) if j not in c]].mean())
                  >= abs(observed) - 1e-12 for c in labelings)
    result = significance.permutation_test(a, b)
    assert (result.labelings, result.exact) == (20, True)
    assert result.p == pytest.approx(extreme / 20)
    assert significance.permutation_test(a, b + 1.0).p == pytest.approx(0.1)


def test_permutation_test_samples_labelings_beyond_the_limit():
    rng = np.random.default_rng(5)
    a, b = rng.normal(0.8, 0.02, (10, 8)), rng.normal(0.805, 0.02, (10, 8))
    exact = significance.permutation_test(a, b)
    sampled = significance.permutation_test(a, b, limit=1000, draws=20_000)
    assert exact.exact and exact.labelings == 12_870 and not sampled.exact
    assert sampled.p == pytest.approx(exact.p, abs=0.02)


def _interval_with_true_components(n: int, k: int) -> comparison.Interval:
    """An Interval whose mean squares are their expectations under the simulation's components."""
    ms = MeanSquares(n, k, np.float64(RESIDUAL ** 2 + n * SEED ** 2), np.float64(RESIDUAL ** 2))
    spread = np.float64(2 * CASE_TRAINER ** 2 + 2 * RESIDUAL ** 2 / k)
    return comparison.Interval(np.float64(0.0), np.float64(np.nan), np.float64(np.nan), np.float64(np.nan),
                               np.float64(np.nan), spread, ms, ms, 0.95)


def test_replicas_needed_from_the_projected_halfwidth():
    """The projected half-width at K replicas matches the mean half-width of simulated comparisons with K
    replicas; the replicas needed are the first K whose projection is below the target; a target below what the
    case-to-case spread allows needs more cases, not replicas (None)."""
    truth = _interval_with_true_components(20, 3)
    rng = np.random.default_rng(6)
    for k in (3, 6, 12):
        a, b = simulate(rng, 2000, 20, k)
        simulated = np.mean(comparison.delta_interval(a, b).halfwidth)
        assert float(comparison.projected_halfwidth(truth, k)) == pytest.approx(simulated, rel=0.1)
    target = float(comparison.projected_halfwidth(truth, 8)) * 1.0001
    assert comparison.replicas_needed(truth, target) == 8
    floor = comparison.cases_halfwidth(truth)
    assert floor == pytest.approx(stats.t.ppf(0.975, 19) * np.sqrt(2 * CASE_TRAINER ** 2 / 20))
    assert comparison.replicas_needed(truth, floor * 0.99) is None
    assert comparison.replicas_needed(truth, 1.0) == comparison.MIN_REPLICAS


def test_projection_at_the_observed_k_is_the_observed_halfwidth():
    a, b = simulate(np.random.default_rng(10), 1, 20, 4)
    result = comparison.compare(a[0], b[0], target_halfwidth=0.004)
    assert float(comparison.projected_halfwidth(result.interval, 4)) == pytest.approx(float(result.interval.halfwidth))
    assert result.needed_for_target == comparison.replicas_needed(result.interval, 0.004)


def test_seed_noise_ratio_interval_covers_the_true_ratio():
    """Equal seed noise in both trainers: the interval for the ratio of seed noise excludes 1 in 5 % +- 1.5 % of
    4000 comparisons (K = 3 and 5); with a true ratio of 3 and K = 10 it is found."""
    for k in (3, 5):
        a, b = simulate(np.random.default_rng(11 + k), 4000, 20, k)
        r = significance.seed_noise_ratio(comparison.replica_means(a), comparison.replica_means(b))
        rate = np.mean((r.low > 1) | (r.high < 1))
        assert 0.035 <= rate <= 0.065, (k, rate)
    a, b = simulate(np.random.default_rng(20), 400, 20, 10, seed_a=0.005, seed_b=0.015, residual=0.001)
    r = significance.seed_noise_ratio(comparison.replica_means(a), comparison.replica_means(b))
    assert np.mean(r.low > 1) > 0.8 and np.median(r.ratio) == pytest.approx(3, rel=0.2)


def test_cases_with_nan_are_left_out():
    """A case whose Dice is NaN (prediction and ground truth both empty, nnU-Net's convention) in any replica of
    either trainer is left out of that comparison, and the result is that of the complete cases."""
    rng = np.random.default_rng(12)
    a, b = rng.normal(0.8, 0.05, (8, 3)), rng.normal(0.8, 0.05, (8, 3))
    a[2, 1] = np.nan
    b[5, 0] = np.nan
    result = comparison.compare(a, b)
    keep = [i for i in range(8) if i not in (2, 5)]
    clean = comparison.compare(a[keep], b[keep])
    assert (result.n_cases, result.left_out) == (6, 2)
    assert result.delta == clean.delta and float(result.interval.low) == float(clean.interval.low)


def test_identical_trainers_give_no_verdict_and_no_error():
    a = np.full((5, 3), 0.9)
    result = comparison.compare(a, a.copy())
    assert result.status == "unresolved" and result.delta == 0.0
    assert np.isnan(result.flips.probability) and np.isnan(result.wilcoxon_p)
    assert comparison.compare(a[:1], a[:1]).status == "no_cases"


def test_lower_is_better_turns_the_verdict():
    """For a volume error (lower is better) a B that is clearly higher is the worse one."""
    a, b = simulate(np.random.default_rng(13), 1, 20, 5, delta=0.2)
    assert comparison.compare(a[0], b[0]).status == "b_better"
    assert comparison.compare(a[0], b[0], higher_is_better=False).status == "a_better"
