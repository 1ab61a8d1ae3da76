"""variability.py against independent computations: plain per-pair numpy, SimpleITK, significantdigits."""
from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_varaug import variability as v


def _random_maps(k=5, shape=(17, 23, 19), labels=4, flip=0.15, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, labels, shape, dtype=np.uint8)
    return np.stack([np.where(rng.random(shape) < flip, rng.integers(0, labels, shape, dtype=np.uint8), base)
                     for _ in range(k)]), base


def _plain_dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else 2.0 * np.logical_and(a, b).sum() / s


LABELS = [v.Structure("a", (1,)), v.Structure("b", (2,)), v.Structure("c", (3,))]


@pytest.mark.parametrize("chunk", [v.DEFAULT_CHUNK, 1000, 7])
def test_pairwise_dice_and_volumes_match_per_pair_numpy(chunk):
    maps, _ = _random_maps()
    dice = v.pairwise_dice(maps, LABELS, chunk=chunk)
    counts = v.overlap_counts(maps, LABELS, chunk=chunk)
    for s, st in enumerate(LABELS):
        for a in range(maps.shape[0]):
            assert counts[s, a, a] == np.count_nonzero(maps[a] == st.labels[0])
            for b in range(maps.shape[0]):
                assert dice[s, a, b] == pytest.approx(_plain_dice(maps[a] == st.labels[0], maps[b] == st.labels[0]),
                                                      abs=1e-12)


def test_matrix_product_path_equals_bincount_path(monkeypatch):
    maps, _ = _random_maps(k=6)
    expected = v.overlap_counts(maps, LABELS)
    monkeypatch.setattr(v, "_MAX_BITS", 2)  # force the K x K matrix product
    np.testing.assert_array_equal(v.overlap_counts(maps, LABELS, chunk=999), expected)


def test_many_replicas_use_matrix_product_and_stay_exact():
    maps, _ = _random_maps(k=20, shape=(9, 10, 11), seed=3)
    dice = v.pairwise_dice(maps, LABELS)
    assert dice[1, 4, 17] == pytest.approx(_plain_dice(maps[4] == 2, maps[17] == 2), abs=1e-12)


def test_pairwise_dice_matches_simpleitk_label_overlap():
    maps, _ = _random_maps(k=4, seed=5)
    dice = v.pairwise_dice(maps, LABELS)
    for a, b in v.pair_indices(4):
        f = sitk.LabelOverlapMeasuresImageFilter()
        f.Execute(sitk.GetImageFromArray(maps[a]), sitk.GetImageFromArray(maps[b]))
        for s, st in enumerate(LABELS):
            assert dice[s, a, b] == pytest.approx(f.GetDiceCoefficient(st.labels[0]), abs=1e-12)


def test_regions_are_unions_of_labels():
    maps, _ = _random_maps(k=3, seed=7)
    region = v.Structure("whole", (1, 2))
    dice = v.pairwise_dice(maps, [region])
    m = np.isin(maps, (1, 2))
    assert dice[0, 0, 2] == pytest.approx(_plain_dice(m[0], m[2]))


def test_absent_in_both_is_one_and_absent_in_one_is_zero():
    maps = np.zeros((3, 4, 4, 4), np.uint8)
    maps[2, 0, 0, 0] = 1
    dice = v.pairwise_dice(maps, [v.Structure("x", (1,))])
    assert dice[0, 0, 1] == v.EMPTY_DICE == 1.0
    assert dice[0, 0, 2] == 0.0


def test_volumes_use_anisotropic_spacing():
    maps = np.zeros((2, 6, 5, 4), np.uint8)
    maps[0, :2, :3, :1] = 1   # 6 voxels
    maps[1, :3, :3, :2] = 1   # 18 voxels
    res = v.analyze_case(maps, (3.0, 0.5, 1.2), [v.Structure("x", (1,))], [0, 1])
    np.testing.assert_allclose(res.volumes_mm3, [[6 * 1.8, 18 * 1.8]])
    # SimpleITK's own physical size of one voxel: spacing given x, y, z
    img = sitk.GetImageFromArray(maps[1])
    img.SetSpacing((1.2, 0.5, 3.0))
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(img)
    assert res.volumes_mm3[0, 1] == pytest.approx(stats.GetPhysicalSize(1))


def test_majority_entropy_disagreement_on_hand_made_voxels():
    # 4 replicas, 5 voxels: unanimous 0 / 3 vs 1 / 2-2 tie (0 vs 2) / 2-2 tie (1 vs 2) / all four different
    maps = np.array([[0, 1, 0, 2, 0],
                     [0, 1, 0, 1, 1],
                     [0, 1, 2, 2, 2],
                     [0, 0, 2, 1, 3]], dtype=np.uint8)
    maj, ent, dis = v.voxel_maps(maps, [0, 1, 2, 3])
    np.testing.assert_array_equal(maj, [0, 1, 0, 1, 0])  # ties go to the smaller label
    h31 = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    np.testing.assert_allclose(ent, [0.0, h31, 1.0, 1.0, 2.0], atol=1e-6)
    np.testing.assert_allclose(dis, [0.0, 0.25, 0.5, 0.5, 0.75])


def test_analyze_case_chunks_agree_and_majority_row_is_the_vote():
    maps, gt = _random_maps(k=5, seed=11)
    whole = v.analyze_case(maps, (1, 1, 1), LABELS, [0, 1, 2, 3], gt=gt)
    chunked = v.analyze_case(maps, (1, 1, 1), LABELS, [0, 1, 2, 3], gt=gt, chunk=101)
    np.testing.assert_array_equal(whole.overlap, chunked.overlap)
    np.testing.assert_array_equal(whole.majority, chunked.majority)
    maj, ent, _ = v.voxel_maps(maps, [0, 1, 2, 3])
    np.testing.assert_array_equal(whole.majority, maj)
    np.testing.assert_allclose(whole.entropy, ent)
    for s, st in enumerate(LABELS):
        g = gt == st.labels[0]
        for k in range(5):
            assert whole.dice_to_gt[s, k] == pytest.approx(_plain_dice(maps[k] == st.labels[0], g))
        assert whole.majority_dice_to_gt[s] == pytest.approx(_plain_dice(maj == st.labels[0], g))
    assert whole.pairwise_dice.shape == (3, 10)


def test_ignore_label_is_left_out_of_dice_to_gt_only():
    maps = np.zeros((2, 10), np.uint8)
    maps[0, :4] = 1
    maps[1, :6] = 1
    gt = np.zeros(10, np.uint8)
    gt[:4] = 1
    gt[4:6] = 9  # ignored
    res = v.analyze_case(maps, (1,), [v.Structure("x", (1,))], [0, 1], gt=gt, ignore=9)
    np.testing.assert_allclose(res.dice_to_gt, [[1.0, 1.0]])
    assert res.pairwise_dice[0, 0] == pytest.approx(2 * 4 / 10)


def test_unknown_label_values_and_k1_are_errors():
    maps = np.zeros((3, 4, 4), np.uint8)
    maps[1, 0, 0] = 7
    with pytest.raises(ValueError, match=r"\[7\]"):
        v.analyze_case(maps, (1, 1), LABELS, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="at least 2"):
        v.analyze_case(maps[:1], (1, 1), LABELS, [0, 1, 2, 3])


def test_significant_digits_equal_direct_significantdigits_call():
    import significantdigits as sd

    rng = np.random.default_rng(2)
    volumes = rng.normal(1000, [1, 10, 100], size=(8, 3))
    bits, digits = v.significant_digits(volumes)
    ref = volumes.mean(axis=0)
    for basis, got in ((2, bits), (10, digits)):
        direct = sd.significant_digits(volumes, reference=ref, axis=0, basis=basis, method="General",
                                       error="Relative")
        np.testing.assert_allclose(got, direct)
    assert bits[0] > bits[1] > bits[2]  # less spread, more digits
    assert digits[0] == pytest.approx(bits[0] * math.log10(2), abs=1.0)


def test_volume_spread_and_absent_structure():
    volumes = np.array([[10.0, 0.0], [12.0, 0.0], [14.0, 0.0]])
    spread = v.volume_spread(volumes)
    np.testing.assert_allclose(spread["mean"], [12.0, 0.0])
    np.testing.assert_allclose(spread["std"], [2.0, 0.0])
    assert spread["cv"][0] == pytest.approx(2.0 / 12.0)
    assert math.isnan(spread["cv"][1]) and math.isnan(spread["sig_bits"][1])


def test_structures_from_dataset_json_labels_and_regions():
    labels = {"background": 0, "organ": 1, "lesion": 2, "ignore": 3}
    st = v.structures_from_dataset_json({"labels": labels})
    assert [(s.name, s.labels) for s in st] == [("organ", (1,)), ("lesion", (2,))]
    regions = {"background": 0, "whole": [1, 2], "lesion": 2}
    st = v.structures_from_dataset_json({"labels": regions, "regions_class_order": [1, 2]})
    assert [(s.name, s.labels, s.key) for s in st] == [("whole", (1, 2), "1+2"), ("lesion", (2,), "2")]
    assert v.label_values({"labels": labels}) == [0, 1, 2]
    assert v.ignore_label({"labels": labels}) == 3


def test_pearson():
    assert v.pearson([1, 2, 3], [2, 4, 6.5]) == pytest.approx(np.corrcoef([1, 2, 3], [2, 4, 6.5])[0, 1])
    assert math.isnan(v.pearson([1], [2]))
