"""Failure detection (nnunet_varaug.evaluation.failure_detection): AURC, E-AURC, Spearman and review thresholds
against hand computations; the normalized surface Dice against a brute-force implementation."""
from __future__ import annotations

import math

import numpy as np
import pytest

from nnunet_varaug.evaluation import failure_detection as fd

pytestmark = pytest.mark.unit

# 8 cases: review score and Dice (hand-built)
SCORES = [0.30, 0.05, 0.10, 0.50, 0.02, 0.20, 0.40, 0.01]
DICE = [0.70, 0.95, 0.85, 0.40, 0.90, 0.88, 0.75, 0.97]


def hand_aurc(scores, dice):
    """Explicit loop: keep the m least uncertain cases (no ties here), mean risk; average over m = 1..n."""
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    total = 0.0
    for m in range(1, len(order) + 1):
        kept = order[:m]
        total += sum(1 - dice[i] for i in kept) / m
    return total / len(order)


def test_aurc_and_eaurc_equal_a_hand_computation():
    a = hand_aurc(SCORES, DICE)
    oracle = hand_aurc([1 - d for d in DICE], DICE)
    assert fd.aurc(np.subtract(1, DICE), SCORES) == pytest.approx(a, abs=1e-12)
    assert fd.eaurc(np.subtract(1, DICE), SCORES) == pytest.approx(a - oracle, abs=1e-12)
    # by hand once more, written out: the ranking 0.01 0.02 0.05 0.10 0.20 0.30 0.40 0.50 holds risks
    risks = [0.03, 0.10, 0.05, 0.15, 0.12, 0.30, 0.25, 0.60]
    assert a == pytest.approx(np.mean([np.mean(risks[:m]) for m in range(1, 9)]), abs=1e-12)
    assert fd.eaurc(np.subtract(1, DICE), SCORES) > 0  # two pairs are swapped (0.05/0.10 and 0.30/0.40)


def test_score_that_orders_cases_exactly_by_dice_has_eaurc_zero():
    perfect = [1 - d for d in DICE]  # any increasing function of the risk
    assert fd.eaurc(np.subtract(1, DICE), perfect) == pytest.approx(0.0, abs=1e-15)
    assert fd.eaurc(np.subtract(1, DICE), np.exp(perfect)) == pytest.approx(0.0, abs=1e-15)
    worst = [d for d in DICE]
    assert fd.eaurc(np.subtract(1, DICE), worst) > fd.eaurc(np.subtract(1, DICE), SCORES)


def test_tied_scores_count_at_their_group_mean():
    risk = np.array([0.1, 0.5, 0.3])
    cov, r = fd.risk_coverage(risk, [1.0, 1.0, 0.0])  # two cases tied
    # least uncertain first: 0.3, then the tied pair at their mean 0.3 each
    np.testing.assert_allclose(r, [0.3, 0.3, 0.3])
    assert fd.aurc(risk, [0, 0, 0]) == pytest.approx(risk.mean())  # no information: the random AURC


def test_spearman_equals_pearson_of_ranks():
    def ranks(x):
        return np.argsort(np.argsort(x)).astype(float)

    expected = np.corrcoef(ranks(SCORES), ranks(DICE))[0, 1]
    assert fd.spearman(SCORES, DICE) == pytest.approx(expected, abs=1e-12)
    assert math.isnan(fd.spearman([1, 1, 1], [0.2, 0.3, 0.4]))


def test_review_thresholds_by_hand():
    failed = [d < 0.8 for d in DICE]  # cases 0 (0.30), 3 (0.50), 6 (0.40)
    rows = {r["share_of_failures"]: r for r in fd.review_thresholds(SCORES, failed)}
    assert rows[0.5]["threshold"] == 0.40 and rows[0.5]["cases_to_review"] == 2 and rows[0.5]["failures_caught"] == 2
    assert rows[1.0]["threshold"] == 0.30 and rows[1.0]["cases_to_review"] == 3
    assert rows[1.0]["false_alarms"] == 0 and rows[0.9]["threshold"] == 0.30
    none = fd.review_thresholds(SCORES, [False] * 8)
    assert all(math.isnan(r["threshold"]) for r in none)


def test_score_rows_leave_out_units_without_dice():
    units = [{"dice": d, "review_score": s} for d, s in zip(DICE, SCORES)] + [{"dice": math.nan, "review_score": 1}]
    row = fd.score_rows("case", units, [("review_score", "review score")])[0]
    assert row["units"] == 8 and row["left_out_no_dice"] == 1 and row["failures"] == 3
    assert row["aurc"] == pytest.approx(hand_aurc(SCORES, DICE))
    assert row["aurc_random"] == pytest.approx(np.mean(np.subtract(1, DICE)))


def brute_force_nsd(pred, gt, spacing, tau):
    """The definition, independently (no scipy.ndimage): boundary voxels (a face neighbour outside the mask or the image), nearest
    boundary voxel of the other mask by a k-d tree over physical coordinates."""
    from scipy.spatial import cKDTree

    def boundary(m):
        p = np.pad(m, 1)
        inner = p[1:-1, 1:-1, 1:-1].copy()
        for axis in range(3):
            for shift in (-1, 1):
                inner &= np.roll(p, shift, axis=axis)[1:-1, 1:-1, 1:-1]
        return np.argwhere(m & ~inner) * np.asarray(spacing)

    bp, bg = boundary(pred), boundary(gt)
    dp = cKDTree(bg).query(bp)[0]
    dg = cKDTree(bp).query(bg)[0]
    return ((dp <= tau).sum() + (dg <= tau).sum()) / (len(bp) + len(bg))


@pytest.mark.parametrize("spacing,tau", [((1.0, 1.0, 1.0), 1.0), ((2.5, 0.8, 1.1), 1.5), ((2.5, 0.8, 1.1), 3.0)])
def test_normalized_surface_dice_equals_brute_force(spacing, tau):
    rng = np.random.default_rng(7)
    gt = np.zeros((14, 18, 16), bool)
    gt[3:10, 4:14, 2:12] = True
    pred = np.roll(gt, 2, axis=1)
    pred[5:8, 2:5, 3:6] = True
    pred &= rng.random(pred.shape) > 0.05  # holes: an irregular boundary
    ours = fd.normalized_surface_dice(pred, gt, spacing, tau)
    assert 0.05 < ours < 0.999
    assert ours == pytest.approx(brute_force_nsd(pred, gt, spacing, tau), abs=1e-12)
    assert fd.normalized_surface_dice(gt, pred, spacing, tau) == pytest.approx(ours, abs=1e-12)  # symmetric


def test_normalized_surface_dice_of_empty_masks():
    e, m = np.zeros((5, 5, 5), bool), np.zeros((5, 5, 5), bool)
    m[2, 2, 2] = True
    assert math.isnan(fd.normalized_surface_dice(e, e, (1, 1, 1)))
    assert fd.normalized_surface_dice(m, e, (1, 1, 1)) == 0.0
    assert fd.normalized_surface_dice(m, m, (1, 1, 1)) == 1.0
    assert math.isnan(fd.dice(e, e)) and fd.dice(m, m) == 1.0
