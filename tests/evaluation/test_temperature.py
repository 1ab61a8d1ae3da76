"""Temperature scaling (nnunet_varaug.evaluation.temperature): scaling equals softmax(z / T); the fit recovers a
planted temperature."""
from __future__ import annotations

import numpy as np
import pytest

from nnunet_varaug.evaluation import temperature

pytestmark = pytest.mark.unit


def softmax(z):
    e = np.exp(z - z.max(axis=0))
    return e / e.sum(axis=0)


def test_scaling_probabilities_equals_softmax_of_scaled_logits():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(4, 50)) * 3
    for t in (0.5, 1.7):
        np.testing.assert_allclose(temperature.scale(softmax(z).astype(np.float32), t), softmax(z / t), atol=2e-6)


@pytest.mark.parametrize("planted", [2.5, 0.6])
def test_fit_recovers_a_planted_temperature(planted, monkeypatch):
    """Labels drawn from softmax(z); the model is over-confident (or under-) by a factor: it outputs softmax(z·T0).
    Dividing its logits by T0 gives back the calibrated model: the fit finds T0 within 5 %."""
    monkeypatch.setattr(temperature, "MAX_VOXELS", 30_000)
    rng = np.random.default_rng(1)
    fit = temperature.Fit()
    for n in (20_000, 60_000):  # the second case is subsampled (MAX_VOXELS)
        z = rng.normal(size=(4, n)) * 2.0
        p = softmax(z)
        gt = (rng.random(n)[None] > np.cumsum(p, axis=0)).sum(axis=0)  # label ~ softmax(z)
        model = softmax(z * planted).astype(np.float32)
        sums, voxels = temperature.nll_sums(model.reshape(4, n, 1), gt.reshape(n, 1), [0, 1, 2, 3])
        assert voxels == n
        fit.add(sums, voxels)
    result = fit.result()
    assert result["temperature"] == pytest.approx(planted, rel=0.05)
    assert not result["at_grid_edge"] and result["nll_at_fit"] < result["nll_at_1"]


def test_nll_sums_equal_a_direct_computation_and_skip_the_ignore_label():
    rng = np.random.default_rng(2)
    p = softmax(rng.normal(size=(3, 40)) * 2).astype(np.float32)
    gt = rng.integers(0, 3, 40)
    gt[:5] = 9
    sums, voxels = temperature.nll_sums(p, gt, [0, 1, 2], ignore=9)
    assert voxels == 35
    t = temperature.grid()[100]
    q = temperature.scale(p, t).astype(np.float64)
    expected = -np.log(q[gt[5:], np.arange(5, 40)]).sum()
    assert sums[100] == pytest.approx(expected, rel=1e-5)


def test_the_parabola_refinement_finds_a_minimum_between_grid_points():
    t = temperature.grid()
    planted = 1.9 * 1.01  # not a grid point
    result = temperature.fit((np.log(t) - np.log(planted)) ** 2)
    assert result["temperature"] == pytest.approx(planted, rel=1e-9) and not result["at_grid_edge"]
    assert temperature.fit(np.log(t))["at_grid_edge"]  # minimum at T_MIN: said so


def test_a_subsampled_case_stands_for_all_its_voxels(monkeypatch):
    rng = np.random.default_rng(3)
    p = softmax(rng.normal(size=(3, 40_000)) * 2).astype(np.float32)
    gt = rng.integers(0, 3, 40_000)
    full, _ = temperature.nll_sums(p, gt, [0, 1, 2])
    monkeypatch.setattr(temperature, "MAX_VOXELS", 8_000)
    sub, voxels = temperature.nll_sums(p, gt, [0, 1, 2])
    assert voxels == 40_000
    np.testing.assert_allclose(sub, full, rtol=0.03)
