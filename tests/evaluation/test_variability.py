"""variability.py against independent computations: plain per-pair numpy, SimpleITK, significantdigits."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_varaug.evaluation import variability as v
from nnunet_varaug.evaluation import volume_stats, voting

pytestmark = pytest.mark.unit


def _random_maps(k=5, shape=(17, 23, 19), labels=4, flip=0.15, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, labels, shape, dtype=np.uint8)
    return np.stack([np.where(rng.random(shape) < flip, rng.integers(0, labels, shape, dtype=np.uint8), base)
                     for _ in range(k)]), base


def _plain_dice(a: np.ndarray, b: np.ndarray, empty: float = 1.0) -> float:
    s = a.sum() + b.sum()
    return empty if s == 0 else 2.0 * np.logical_and(a, b).sum() / s


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
    maj, ent, dis = voting.voxel_maps(maps, [0, 1, 2, 3])
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
    maj, ent, _ = voting.voxel_maps(maps, [0, 1, 2, 3])
    np.testing.assert_array_equal(whole.majority, maj)
    np.testing.assert_allclose(whole.entropy, ent)
    for s, st in enumerate(LABELS):
        g = gt == st.labels[0]
        for k in range(5):
            assert whole.dice_to_gt[s, k] == pytest.approx(_plain_dice(maps[k] == st.labels[0], g, math.nan),
                                                           nan_ok=True)
        assert whole.majority_dice_to_gt[s] == pytest.approx(_plain_dice(maj == st.labels[0], g, math.nan),
                                                             nan_ok=True)
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
    bits, digits = volume_stats.significant_digits(volumes)
    ref = volumes.mean(axis=0)
    for basis, got in ((2, bits), (10, digits)):
        direct = sd.significant_digits(volumes, reference=ref, axis=0, basis=basis, method="General",
                                       error="Relative")
        np.testing.assert_allclose(got, direct)
    assert bits[0] > bits[1] > bits[2]  # less spread, more digits
    assert digits[0] == pytest.approx(bits[0] * math.log10(2), abs=1.0)


def test_volume_spread_and_absent_structure():
    volumes = np.array([[10.0, 0.0], [12.0, 0.0], [14.0, 0.0]])
    spread = volume_stats.volume_spread(volumes)
    np.testing.assert_allclose(spread["mean"], [12.0, 0.0])
    np.testing.assert_allclose(spread["std"], [2.0, 0.0])
    assert spread["cv"][0] == pytest.approx(2.0 / 12.0)
    assert math.isnan(spread["cv"][1]) and math.isnan(spread["sig_bits"][1])


def test_empty_against_non_empty_is_zero_bits_not_nan():
    """The worst disagreement: every replica empty and the IEEE reference not (column 0), or the reference empty and
    a replica not (column 1). Both are 0 bits and stay in the median; absent everywhere (column 2) has no value."""
    volumes = np.array([[0.0, 5.0, 0.0, 100.0], [0.0, 0.0, 0.0, 101.0], [0.0, 6.0, 0.0, 99.0]])
    reference = np.array([7.0, 0.0, 0.0, 100.0])
    bits, digits = volume_stats.significant_digits(volumes, reference)
    assert list(bits[:2]) == [0.0, 0.0] and list(digits[:2]) == [0.0, 0.0] and math.isnan(bits[2])
    spread = volume_stats.volume_spread(volumes, volumes, reference)
    assert list(spread["sig_bits"][:2]) == [0.0, 0.0]
    summary = volume_stats.summarize_digits(spread)
    assert summary["sig_cases"] == 3  # column 2 carries no value, and the count says so
    assert summary["sig_bits_median"] == pytest.approx(0.0)


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


# ---- conventions of issue 12 ------------------------------------------------------------------------------------
class _InProcessPool:
    """Stands in for nnU-Net's spawn pool so its own metric code runs in this process (seconds, not tens)."""

    def __init__(self, *_):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *_):
        return False

    def starmap(self, fn, args):
        return [fn(*a) for a in args]


def test_dice_to_gt_equals_nnunet_compute_metrics_on_folder_with_an_empty_structure(tmp_path, monkeypatch):
    """Label 2 is absent from the ground truth and from replicas 0 and 2 in case 'a': nnU-Net scores NaN there and
    leaves it out of its mean; our per-label values must equal its summary, NaN for NaN."""
    import types

    from nnunetv2.evaluation import evaluate_predictions as ev
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    monkeypatch.setattr(ev, "multiprocessing", types.SimpleNamespace(
        get_context=lambda *_: types.SimpleNamespace(Pool=_InProcessPool)))
    rng = np.random.default_rng(4)
    shape = (9, 10, 11)
    gts = {"a": rng.integers(0, 2, shape).astype(np.uint8), "b": rng.integers(0, 3, shape).astype(np.uint8)}
    preds = {}
    for case, gt in gts.items():
        maps = np.stack([np.where(rng.random(shape) < 0.2, rng.integers(0, 3, shape), gt) for _ in range(3)])
        maps = maps.astype(np.uint8)
        if case == "a":
            maps[[0, 2]] = np.where(maps[[0, 2]] == 2, 0, maps[[0, 2]])
        preds[case] = maps

    def write(arr, path):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing((0.8, 1.1, 2.0))
        sitk.WriteImage(img, str(path))

    (tmp_path / "gt").mkdir()
    for case, gt in gts.items():
        write(gt, tmp_path / "gt" / f"{case}.nii.gz")
    structures = [v.Structure("one", (1,)), v.Structure("two", (2,))]
    ours = {c: v.analyze_case(preds[c], (2.0, 1.1, 0.8), structures, [0, 1, 2], gt=gts[c]) for c in gts}
    for k in range(3):
        folder = tmp_path / f"r{k}"
        folder.mkdir()
        for case in gts:
            write(preds[case][k], folder / f"{case}.nii.gz")
        theirs = ev.compute_metrics_on_folder(str(tmp_path / "gt"), str(folder), str(folder / "summary.json"),
                                              SimpleITKIO(), ".nii.gz", [1, 2], num_processes=1)
        for entry in theirs["metric_per_case"]:
            case = os.path.basename(entry["reference_file"])[: -len(".nii.gz")]
            for s, label in enumerate((1, 2)):
                assert ours[case].dice_to_gt[s, k] == pytest.approx(entry["metrics"][label]["Dice"], nan_ok=True)
        for s, label in enumerate((1, 2)):
            assert np.nanmean([ours[c].dice_to_gt[s, k] for c in gts]) == pytest.approx(
                theirs["mean"][label]["Dice"])
    assert math.isnan(ours["a"].dice_to_gt[1, 0]) and ours["a"].dice_to_gt[1, 1] == 0.0


def test_tie_resolved_by_mean_probability_by_hand():
    # K = 4, labels 0..2. Voxel 0: 2-2 tie between 0 and 1, mean probability favours 1 (0.55 > 0.40).
    # Voxel 1: 2-2 tie between 1 and 2, probability favours 1 (the smaller label: equal outcome as the old rule).
    # Voxel 2: tie 0 vs 2 with equal probabilities: the smaller label. Voxel 3: 3-1, no tie, probability ignored.
    maps = np.array([[0, 1, 0, 2],
                     [0, 1, 2, 2],
                     [1, 2, 0, 2],
                     [1, 2, 2, 0]], dtype=np.uint8)
    prob = np.array([[0.40, 0.10, 0.45, 0.90],
                     [0.55, 0.60, 0.10, 0.05],
                     [0.05, 0.30, 0.45, 0.05]], dtype=np.float32)
    maj, _, _ = voting.voxel_maps(maps, [0, 1, 2], prob)
    np.testing.assert_array_equal(maj, [1, 1, 0, 2])
    maj_plain, _, _ = voting.voxel_maps(maps, [0, 1, 2])
    np.testing.assert_array_equal(maj_plain, [0, 1, 0, 2])  # without probabilities: smallest label
    res = v.analyze_case(maps[:, None, :], (1, 1), [v.Structure("x", (1,))], [0, 1, 2],
                         probabilities=prob[:, None, :], chunk=3)
    np.testing.assert_array_equal(res.majority[0], [1, 1, 0, 2])
    assert res.tie_voxels == 3 and res.ties_by_probability == 2


def test_normalised_entropy_divides_by_log2_k():
    maps = np.array([[0, 0], [1, 0], [2, 0], [3, 1]], dtype=np.uint8)  # K = 4: all differ / 3-1
    _, ent, _ = voting.voxel_maps(maps, [0, 1, 2, 3])
    np.testing.assert_allclose(voting.normalised_entropy(ent, 4), [1.0, ent[1] / 2.0], rtol=1e-6)


def test_dice_to_reference_model():
    rng = np.random.default_rng(8)
    maps, base = _random_maps(k=3, seed=9)
    ref = np.where(rng.random(base.shape) < 0.1, 0, base).astype(np.uint8)
    res = v.analyze_case(maps, (1, 1, 1), LABELS, [0, 1, 2, 3], gt=base, ignore=None, reference=ref, chunk=500)
    for s, st in enumerate(LABELS):
        r = ref == st.labels[0]
        for k in range(3):
            assert res.dice_to_reference[s, k] == pytest.approx(_plain_dice(maps[k] == st.labels[0], r))
        assert res.reference_volume_mm3[s] == r.sum()
        assert res.reference_dice_to_gt[s] == pytest.approx(_plain_dice(r, base == st.labels[0]))


def test_unanimous_case_does_not_move_significant_digits_beyond_the_cap():
    """Issue 12's measurement: 10 replicas x 10 cases at ~1 % spread, one unanimous case. The package gives it
    52 bits; the summary must neither average it in nor report more than the voxel count allows."""
    import significantdigits as sd

    rng = np.random.default_rng(0)
    voxels = np.rint(rng.normal(5000, 50, size=(10, 10)))
    voxels[:, 3] = 5123  # unanimous
    volumes = voxels * 0.7
    direct = np.asarray(sd.significant_digits(volumes, reference=volumes.mean(axis=0), axis=0, basis=2,
                                              method="General", error="Relative"), dtype=float)
    assert direct[3] == 52
    spread = volume_stats.volume_spread(volumes, voxels)
    summary = volume_stats.summarize_digits(spread)
    others = np.delete(direct, 3)
    cap = math.floor(math.log2(voxels.max(axis=0)[3])) + 1  # 13 bits for 5123 voxels
    assert summary["unanimous_cases"] == 1 and bool(spread["unanimous"][3])
    assert summary["sig_bits_mean"] == pytest.approx(others.mean())  # the 9 others, straight from the package
    assert summary["sig_bits_median"] == pytest.approx(np.median(np.append(others, cap)))
    assert summary["sig_bits_median"] <= cap and summary["sig_bits_mean"] < 10


def test_significant_bits_never_exceed_the_voxel_cap():
    """The cap floor(log2 n) + 1: half of the replicas one voxel away from the others reach it, never more."""
    for n in (7, 100, 1000, 1023, 1024, 5000, 65537):
        for ones in (1, 5):
            voxels = np.array([[n + 1.0]] * ones + [[float(n)]] * (10 - ones))
            bits, _ = volume_stats.significant_digits(voxels)
            assert bits[0] <= volume_stats.bits_cap(voxels)[0]
        if math.floor(math.log2(n)) == math.floor(math.log2(n + 1)):
            assert bits[0] == volume_stats.bits_cap(voxels)[0]  # 5 vs 5 reaches it: the cap is tight


def test_bound_probability_is_the_packages():
    import significantdigits as sd

    assert volume_stats.bound_probability(10) == pytest.approx(1 + math.log(0.05) / 10)
    assert volume_stats.bound_probability(10) == sd.probability_estimation_bernoulli(10, 10, 0.95)
    assert volume_stats.bound_probability(10) < 0.95  # issue 12: K = 10 gives far less than 95 % / 95 %
    # minimum_number_of_trials is the exact binomial bound ceil(ln(1 - c) / ln p), not the inverse of the
    # linearised 1 + ln(1 - c) / K above (which gives 0.949 at K = 59): the report quotes each by name
    n = volume_stats.trials_needed()
    assert n == 59 and 0.95 ** n <= 0.05 < 0.95 ** (n - 1)
