"""ECE, Brier score and reliability (nnunet_varaug.evaluation.calibration) against hand computations."""
from __future__ import annotations

import numpy as np
import pytest

from nnunet_varaug.evaluation import calibration

pytestmark = pytest.mark.unit


def test_ece_and_brier_by_hand():
    # one case of 6 voxels, 2 labels; probabilities of label 1 and ground truth
    p1 = np.array([0.05, 0.12, 0.18, 0.95, 1.0, 0.55], dtype=np.float32)
    gt = np.array([0, 0, 1, 1, 1, 0])
    probs = np.stack([1 - p1, p1])
    counts = calibration.CalibrationCounts([0, 1])
    counts.add("m", probs, gt)
    # label 1 bins: [0.0,0.1): {0.05 -> 0}; [0.1,0.2): {0.12 -> 0, 0.18 -> 1} (mean 0.15); [0.5,0.6): {0.55 -> 0};
    # [0.9,1.0]: {0.95 -> 1, 1.0 -> 1}
    ece1 = (1 / 6) * 0.05 + (2 / 6) * abs(0.5 - 0.15) + (1 / 6) * 0.55 + (2 / 6) * abs(1 - 0.975)
    brier1 = np.mean((p1.astype(np.float64) - (gt == 1)) ** 2)
    assert counts.ece("m")[1] == pytest.approx(ece1, abs=1e-7)
    assert counts.brier("m")[1] == pytest.approx(brier1, abs=1e-7)
    # label 0 is the mirror image: same Brier
    assert counts.brier("m")[0] == pytest.approx(brier1, abs=1e-7)
    rows = counts.rows({0: "bg", 1: "fg"})
    assert [r["label"] for r in rows] == ["0", "1", "all"]
    assert rows[2]["brier"] == pytest.approx(2 * brier1, abs=1e-7)


def test_ignore_label_voxels_are_left_out():
    p1 = np.array([0.9, 0.2, 0.7], dtype=np.float32)
    gt = np.array([1, 0, 5])
    counts = calibration.CalibrationCounts([0, 1])
    counts.add("m", np.stack([1 - p1, p1]), gt, ignore=5)
    assert counts.data["m"][1, :, 0].sum() == 2
    assert counts.brier("m")[1] == pytest.approx((0.1 ** 2 + 0.2 ** 2) / 2, abs=1e-7)


def test_cases_add_up_and_survive_json():
    rng = np.random.default_rng(0)
    p = rng.random((2, 3, 10, 10)).astype(np.float32)
    p /= p.sum(axis=1, keepdims=True)
    gt = rng.integers(0, 3, (2, 10, 10))
    whole, parts, sequential = (calibration.CalibrationCounts([0, 1, 2]) for _ in range(3))
    whole.add("m", np.concatenate([p[0], p[1]], axis=1), np.concatenate([gt[0], gt[1]]))
    for i in range(2):
        one = calibration.CalibrationCounts([0, 1, 2])
        one.add("m", p[i], gt[i])
        sequential.add("m", p[i], gt[i])
        parts.merge(calibration.CalibrationCounts.from_json(one.to_json()))
    np.testing.assert_allclose(parts.ece("m"), whole.ece("m"), atol=1e-12)
    np.testing.assert_allclose(parts.brier("m"), whole.brier("m"), atol=1e-12)
    np.testing.assert_allclose(sequential.ece("m"), whole.ece("m"), atol=1e-12)
    np.testing.assert_allclose(sequential.brier("m"), whole.brier("m"), atol=1e-12)


def test_ensemble_of_identical_replicas_has_the_replicas_calibration():
    from nnunet_varaug.evaluation.uncertainty import RunningEnsemble

    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 8, 8, 8)) * 2
    p = (np.exp(logits) / np.exp(logits).sum(axis=0)).astype(np.float32)
    gt = rng.integers(0, 3, (8, 8, 8))
    counts = calibration.CalibrationCounts([0, 1, 2])
    ens = RunningEnsemble()
    for k in range(3):
        counts.add(f"r{k}", p, gt)
        ens.add(p, p.argmax(axis=0))
    counts.add("ensemble", ens.mean(), gt)
    np.testing.assert_allclose(counts.ece("ensemble"), counts.ece("r0"), atol=1e-6)
    np.testing.assert_allclose(counts.brier("ensemble"), counts.brier("r0"), atol=1e-7)
