"""``VariabilitySampleTransform``: which channel it keeps, how often, and what it refuses."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nnunet_varaug.training.transforms import VariabilitySampleTransform

pytestmark = pytest.mark.unit


def stacked(k: int, spatial=(4, 5, 6)) -> torch.Tensor:
    """Channel c is filled with the value c, so the output tells which channel was kept."""
    return torch.arange(1 + k, dtype=torch.int16).view(-1, *([1] * len(spatial))).expand(1 + k, *spatial).clone()


def kept(transform, seg: torch.Tensor, image=None) -> int:
    out = transform(image=image if image is not None else torch.zeros(1, *seg.shape[1:]), segmentation=seg.clone())
    s = out["segmentation"]
    assert s.shape == (1, *seg.shape[1:]) and s.dtype == seg.dtype
    values = torch.unique(s)
    assert len(values) == 1
    return int(values[0])


@pytest.mark.parametrize("spatial", [(7, 9), (4, 5, 6)], ids=["2d", "3d"])
def test_p0_keeps_ground_truth_and_p1_always_replaces(spatial):
    np.random.seed(0)
    seg = stacked(3, spatial)
    assert all(kept(VariabilitySampleTransform(0.0, 3), seg) == 0 for _ in range(200))
    assert all(kept(VariabilitySampleTransform(1.0, 3), seg) in (1, 2, 3) for _ in range(200))


def test_image_untouched_and_output_independent_of_input_storage():
    torch.manual_seed(1)
    image = torch.randn(2, 4, 5, 6)
    out = VariabilitySampleTransform(1.0, 2)(image=image.clone(), segmentation=stacked(2))
    assert torch.equal(out["image"], image)
    assert out["segmentation"].is_contiguous()


def chi_square_p_value(counts: np.ndarray, expected: np.ndarray) -> float:
    """Upper tail of the chi-square statistic (Wilson-Hilferty approximation; scipy is not a dependency)."""
    stat = float(((counts - expected) ** 2 / expected).sum())
    dof = len(counts) - 1
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def test_distribution_over_ground_truth_and_replicas_chi_square():
    """GT with probability 1 - p, each of the K replicas with p / K."""
    np.random.seed(2)
    k, p, n = 5, 0.6, 3000
    t = VariabilitySampleTransform(p, k)
    seg = stacked(k, (2, 2, 2))
    counts = np.bincount([kept(t, seg) for _ in range(n)], minlength=k + 1)
    expected = n * np.array([1 - p] + [p / k] * k)
    assert chi_square_p_value(counts, expected) > 1e-3, counts
    # and the test has power: a uniform choice over all 1 + K channels is rejected
    assert chi_square_p_value(counts, np.full(k + 1, n / (k + 1))) < 1e-6


def test_same_draws_for_any_p_and_k():
    """Two uniforms from numpy per sample whatever p and K: pipelines with different p/K share one random stream."""
    np.random.seed(3)
    np.random.random_sample(2)
    reference = np.random.random_sample(3)
    for p, k in ((0.0, 1), (0.5, 3), (1.0, 10)):
        np.random.seed(3)
        VariabilitySampleTransform(p, k).get_parameters()
        assert np.array_equal(np.random.random_sample(3), reference)


@pytest.mark.parametrize("p", [-0.01, 1.01, float("nan"), float("inf"), "half"])
def test_p_outside_unit_interval_refused(p):
    with pytest.raises(ValueError, match="p must"):
        VariabilitySampleTransform(p, 2)


@pytest.mark.parametrize("k", [0, -1, 1.5, True])
def test_no_samples_refused(k):
    with pytest.raises(ValueError, match="num_samples"):
        VariabilitySampleTransform(0.5, k)


def test_wrong_number_of_channels_refused():
    with pytest.raises(ValueError, match="1 \\+ K = 4 channels"):
        VariabilitySampleTransform(0.5, 3)(image=torch.zeros(1, 4, 5, 6), segmentation=stacked(2))
