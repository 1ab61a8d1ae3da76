"""Class-wise and top-label ECE, NLL, Brier score and the region of interest (nnunet_varaug.evaluation.calibration)
against plain loops over voxels."""
from __future__ import annotations

import math

import numpy as np
import pytest

from nnunet_varaug.evaluation import calibration

pytestmark = pytest.mark.unit


def loop_metrics(p, gt, labels, bins=10):
    """Every metric by explicit Python loops over voxels and bins (p: (C, N) float, gt: (N,))."""
    n = gt.size
    def bin_of(x):
        return min(int(x * bins), bins - 1)
    def ece(conf, hit):
        total = 0.0
        for b in range(bins):
            members = [i for i in range(n) if bin_of(conf[i]) == b]
            if members:
                total += len(members) / n * abs(sum(hit[i] for i in members) / len(members)
                                                - sum(conf[i] for i in members) / len(members))
        return total
    classwise = [ece([float(p[c, i]) for i in range(n)], [float(gt[i] == labels[c]) for i in range(n)])
                 for c in range(len(labels))]
    top = ece([float(max(p[:, i])) for i in range(n)],
              [float(labels[int(np.argmax(p[:, i]))] == gt[i]) for i in range(n)])
    nll = sum(-math.log(max(float(p[labels.index(int(gt[i])), i]), calibration.NLL_FLOOR)) for i in range(n)) / n
    brier = [sum((float(p[c, i]) - float(gt[i] == labels[c])) ** 2 for i in range(n)) / n for c in range(len(labels))]
    return classwise, top, nll, brier


def random_case(rng, shape=(6, 7, 8), c=3):
    logits = rng.normal(size=(c, *shape)) * 2.5
    p = np.exp(logits) / np.exp(logits).sum(axis=0)
    flat = p.reshape(c, -1)
    gt = np.array([rng.choice(c, p=flat[:, i] / flat[:, i].sum()) for i in range(flat.shape[1])]).reshape(shape)  # roughly calibrated
    return p.astype(np.float32), gt


def test_all_metrics_equal_plain_loops():
    rng = np.random.default_rng(0)
    p, gt = random_case(rng)
    p[:, 0, 0, 0] = [0.0, 1.0, 0.0]  # p = 1 falls in the last bin; p_y = 0 hits the NLL floor below
    gt[0, 0, 0] = 0
    counts = calibration.CalibrationCounts([0, 1, 2])
    counts.add("m", p, gt)
    classwise, top, nll, brier = loop_metrics(p.reshape(3, -1), gt.reshape(-1), [0, 1, 2])
    np.testing.assert_allclose(counts.classwise_ece("m"), classwise, atol=1e-7)
    assert counts.top_label_ece("m") == pytest.approx(top, abs=1e-7)
    assert counts.nll("m") == pytest.approx(nll, rel=1e-7)
    np.testing.assert_allclose(counts.brier("m"), brier, atol=1e-7)
    rows = counts.rows({0: "bg", 1: "a", 2: "b"})
    everything = [r for r in rows if r["label"] == "all" and r["scope"] == "all"][0]
    assert everything["brier"] == pytest.approx(sum(brier), abs=1e-7) and everything["nll"] == pytest.approx(nll)


def test_class_wise_ece_is_not_top_label_ece():
    """Two voxels, both predicted label 1 with 0.6 and right: top-label ECE 0.4; class-wise ECE of label 1 too,
    of label 0 (p = 0.4, never true) 0.4 as well — but a third, wrong voxel separates them."""
    p1 = np.array([0.6, 0.6, 0.6], np.float32)
    gt = np.array([1, 1, 0])
    counts = calibration.CalibrationCounts([0, 1])
    counts.add("m", np.stack([1 - p1, p1]), gt)
    assert counts.top_label_ece("m") == pytest.approx(abs(2 / 3 - 0.6), abs=1e-7)
    assert counts.classwise_ece("m")[0] == pytest.approx(abs(1 / 3 - 0.4), abs=1e-7)


def test_padding_with_perfect_background_changes_all_voxel_ece_not_roi_ece():
    rng = np.random.default_rng(1)
    shape = (20, 20, 20)
    fg = np.zeros(shape, bool)
    fg[8:12, 8:12, 8:12] = True
    p1 = np.where(fg, rng.uniform(0.5, 0.9, shape), rng.uniform(0.0, 0.3, shape) * (rng.random(shape) < 0.1))
    gt = (fg & (rng.random(shape) < 0.8)).astype(int)
    probs = np.stack([1 - p1, p1]).astype(np.float32)
    padded_probs = np.zeros((2, 160, 20, 20), np.float32)  # 8x the voxels, the rest perfect background
    padded_probs[0] = 1.0
    padded_probs[:, 70:90] = probs
    padded_gt = np.zeros((160, 20, 20), int)
    padded_gt[70:90] = gt
    small, big = calibration.CalibrationCounts([0, 1]), calibration.CalibrationCounts([0, 1])
    small.add_case("m", probs, gt, None, (1.0, 1.0, 1.0))
    big.add_case("m", padded_probs, padded_gt, None, (1.0, 1.0, 1.0))
    ratio = small.classwise_ece("m")[1] / big.classwise_ece("m")[1]
    assert ratio == pytest.approx(8.0, rel=1e-6)
    assert small.brier("m")[1] / big.brier("m")[1] == pytest.approx(8.0, rel=1e-6)
    # the ROI (foreground of model or label, dilated by 5 mm) fits inside the small image: the same voxels
    np.testing.assert_allclose(big.classwise_ece("m", "roi"), small.classwise_ece("m", "roi"), atol=1e-12)
    assert big.top_label_ece("m", "roi") == pytest.approx(small.top_label_ece("m", "roi"), abs=1e-12)
    assert big.nll("m", "roi") == pytest.approx(small.nll("m", "roi"), abs=1e-12)
    assert big.stats["roi"]["m"]["n"] == small.stats["roi"]["m"]["n"] < 20 ** 3


def test_roi_is_the_dilated_foreground_by_brute_force():
    from scipy.spatial.distance import cdist

    fg = np.zeros((12, 9, 10), bool)
    fg[5, 4, 4] = fg[6, 4, 5] = True
    spacing = np.array([2.0, 1.0, 0.6])
    roi = calibration.roi_mask(fg, spacing, 2.5)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in fg.shape], indexing="ij"), -1).reshape(-1, 3) * spacing
    d = cdist(grid, grid[fg.ravel()]).min(axis=1)
    np.testing.assert_array_equal(roi.ravel(), d <= 2.5)


def test_chunks_with_the_case_roi_add_up_to_the_whole_case():
    rng = np.random.default_rng(3)
    p, gt = random_case(rng, (12, 6, 6))
    whole, chunked = calibration.CalibrationCounts([0, 1, 2]), calibration.CalibrationCounts([0, 1, 2])
    whole.add_case("m", p, gt, None, (1.0, 2.0, 1.0))
    roi = calibration.model_roi(p, gt, [0, 1, 2], (1.0, 2.0, 1.0))
    for a, b in ((0, 5), (5, 12)):
        chunked.add("m", p[:, a:b], gt[a:b], None, roi[a:b])
    for scope in calibration.SCOPES:
        np.testing.assert_allclose(chunked.classwise_ece("m", scope), whole.classwise_ece("m", scope), atol=1e-12)
        assert chunked.nll("m", scope) == pytest.approx(whole.nll("m", scope), rel=1e-12)


def test_ignore_label_voxels_are_left_out():
    p1 = np.array([0.9, 0.2, 0.7], dtype=np.float32)
    gt = np.array([1, 0, 5])
    counts = calibration.CalibrationCounts([0, 1])
    counts.add("m", np.stack([1 - p1, p1]), gt, ignore=5)
    assert counts.stats["all"]["m"]["n"] == 2
    assert counts.brier("m")[1] == pytest.approx((0.1 ** 2 + 0.2 ** 2) / 2, abs=1e-7)


def test_cases_add_up_and_survive_json():
    rng = np.random.default_rng(0)
    p = rng.random((2, 3, 10, 10)).astype(np.float32)
    p /= p.sum(axis=1, keepdims=True)
    gt = rng.integers(0, 3, (2, 10, 10))
    whole, parts = calibration.CalibrationCounts([0, 1, 2]), calibration.CalibrationCounts([0, 1, 2])
    whole.add("m", np.concatenate([p[0], p[1]], axis=1), np.concatenate([gt[0], gt[1]]))
    for i in range(2):
        one = calibration.CalibrationCounts([0, 1, 2])
        one.add("m", p[i], gt[i])
        parts.merge(calibration.CalibrationCounts.from_json(one.to_json()))
    for metric in ("classwise_ece", "brier", "top_label_ece", "nll"):
        np.testing.assert_allclose(getattr(parts, metric)("m"), getattr(whole, metric)("m"), atol=1e-12)


def test_ensemble_of_identical_replicas_has_the_replicas_calibration():
    from nnunet_varaug.evaluation.uncertainty import RunningEnsemble

    rng = np.random.default_rng(1)
    p, gt = random_case(rng, (8, 8, 8))
    counts = calibration.CalibrationCounts([0, 1, 2])
    ens = RunningEnsemble()
    for k in range(3):
        counts.add(f"r{k}", p, gt)
        ens.add(p, p.argmax(axis=0))
    counts.add("ensemble", ens.mean(), gt)
    np.testing.assert_allclose(counts.classwise_ece("ensemble"), counts.classwise_ece("r0"), atol=1e-6)
    np.testing.assert_allclose(counts.brier("ensemble"), counts.brier("r0"), atol=1e-7)
