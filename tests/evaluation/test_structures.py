"""Per-structure uncertainty and the size-aware review score (nnunet_varaug.evaluation.structures) against numpy,
scipy and simulation."""
from __future__ import annotations

import numpy as np
import pytest

from nnunet_varaug.evaluation import structures, uncertainty
from nnunet_varaug.evaluation.variability import Structure

pytestmark = pytest.mark.unit

ORGAN_LESION = [Structure("organ", (1,)), Structure("lesion", (2,))]


def one_hot_mean(maps, c=3):
    return np.stack([(maps == v).mean(axis=0) for v in range(c)]).astype(np.float32)


def rows_of(maps, spacing=(1.0, 1.0, 1.0), consensus=None):
    mean = one_hot_mean(maps)
    consensus = mean.argmax(axis=0) if consensus is None else consensus
    zeros = np.zeros(maps.shape[1:], np.float32)
    return structures.rows_from_arrays(maps, consensus, mean, zeros + 0.5, zeros + 0.25, spacing, ORGAN_LESION,
                                       [0, 1, 2])


def large_band_case(k=10):
    """A 20³ organ whose replicas' boundary moves by 0..4 voxels along one axis: a wide uncertain band."""
    maps = np.zeros((k, 32, 32, 32), np.uint8)
    for i in range(k):
        maps[i, 4 + i % 5:24 + i % 5, 6:26, 6:26] = 1
    return maps


def speck_case(k=10):
    """Every replica agrees on the organ; one replica adds a 1-voxel lesion."""
    maps = np.zeros((k, 32, 32, 32), np.uint8)
    maps[:, 6:26, 6:26, 6:26] = 1
    maps[3, 0, 0, 0] = 2
    return maps


def test_large_uncertain_structure_outranks_a_one_voxel_speck():
    per_case = {"band": rows_of(large_band_case()), "speck": rows_of(speck_case())}
    table = structures.review_table(per_case, may_be_absent=["lesion"])  # 'band' has no lesion: allowed
    assert [r["case"] for r in table] == ["band", "speck"]
    assert table[0]["structure"] == "organ" and table[0]["score"] > 0.05
    assert table[1]["score"] < 1e-3
    # the old score (1 - min mean pairwise Dice) put the speck first: the bug this replaces
    old = {c: uncertainty.summarize_case(m, m[0], (1, 1, 1), ORGAN_LESION)
           for c, m in (("band", large_band_case()), ("speck", speck_case()))}
    assert uncertainty.review_rows(old, ORGAN_LESION)[0]["case"] == "speck"


def test_review_score_formula_by_hand():
    row = {"detected_by": 1, "replica_mean_mm3": 0.1, "mean_pairwise_dice": 0.8}
    score, reason = structures.review_score(row, 100.0)
    assert score == pytest.approx(0.2 * 0.001) and reason == "replicas disagree; smaller than 100 mm³"
    row = {"detected_by": 10, "replica_mean_mm3": 8000.0, "mean_pairwise_dice": 0.928}
    assert structures.review_score(row, 100.0)[0] == pytest.approx(0.072)


def test_structure_absent_from_every_replica_is_agreement_only_where_allowed():
    maps = speck_case()
    maps[3, 0, 0, 0] = 0  # no lesion anywhere
    rows = rows_of(maps)
    assert rows[1]["detected_by"] == 0
    assert structures.case_review(rows)[:3] == (1.0, "lesion", structures.ABSENT)
    assert structures.case_review(rows, may_be_absent=["lesion"])[0] == 0.0
    assert structures.case_review(rows, may_be_absent=["2"])[0] == 0.0  # by label value too
    with pytest.raises(ValueError, match="not a structure"):
        structures.check_structure_names(["liver"], ORGAN_LESION, "--may-be-absent")


def test_volumes_uncertainty_and_detection_equal_numpy():
    rng = np.random.default_rng(0)
    k = 5
    maps = large_band_case(k)
    maps[1, 28:30, 28:30, 28:30] = 2
    maps[2, 28:31, 28:30, 28:30] = 2
    spacing = (2.0, 1.0, 0.5)
    mean = one_hot_mean(maps)
    mean = mean * 0.9 + 0.1 / 3  # soft probabilities, still summing to 1
    consensus = mean.argmax(axis=0)
    ent, mi = rng.random(consensus.shape).astype(np.float32), rng.random(consensus.shape).astype(np.float32)
    rows = structures.rows_from_arrays(maps, consensus, mean, ent, mi, spacing, ORGAN_LESION, [0, 1, 2])
    voxel = 1.0
    for row, label in zip(rows, (1, 2)):
        m = maps == label
        vols = np.sort(m.reshape(k, -1).sum(1) * voxel)
        c = consensus == label
        assert row["consensus_mm3"] == c.sum() * voxel
        assert row["soft_mm3"] == pytest.approx(mean[label].astype(np.float64).sum() * voxel, rel=1e-6)
        assert row["replica_min_mm3"] == vols[0] and row["replica_max_mm3"] == vols[-1]
        assert row["replica_second_lo_mm3"] == vols[1] and row["replica_second_hi_mm3"] == vols[-2]
        assert row["replica_sd_mm3"] == pytest.approx(vols.std(ddof=1))
        n = m.sum(0)
        assert row["uncertain_mm3"] == ((n > 0) & (n < k)).sum() * voxel
        assert row["detected_by"] == int((m.reshape(k, -1).sum(1) > 0).sum())
        if c.any():
            assert row["mi_in_structure_bits"] == pytest.approx(mi[c].mean(), rel=1e-6)
            assert row["uncertain_share"] == pytest.approx(row["uncertain_mm3"] / row["consensus_mm3"])
    assert rows[1]["detected_by"] == 2 and rows[1]["consensus_mm3"] == 0
    assert np.isnan(rows[1]["uncertain_share"]) and np.isnan(rows[1]["mi_in_band_bits"])


def test_boundary_band_equals_brute_force_distances():
    from scipy.spatial.distance import cdist

    mask = np.zeros((9, 10, 11), bool)
    mask[2:7, 3:8, 1:6] = True
    mask[4, 8, 3] = True
    spacing = np.array([2.0, 1.0, 0.7])
    band = structures.boundary_band(mask, spacing, width=1.5)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in mask.shape], indexing="ij"), -1).reshape(-1, 3) * spacing
    inside, outside = grid[mask.ravel()], grid[~mask.ravel()]
    d = np.empty(mask.size)
    d[mask.ravel()] = cdist(inside, outside).min(1)  # an inside voxel: distance to the nearest outside voxel
    d[~mask.ravel()] = cdist(outside, inside).min(1)
    np.testing.assert_array_equal(band.ravel(), d <= 1.5)


@pytest.mark.parametrize("k", [5, 10])
def test_order_statistic_interval_coverage_by_simulation(k):
    rng = np.random.default_rng(k)
    x = rng.normal(size=(200_000, k + 1))
    past, new = np.sort(x[:, :k], axis=1), x[:, k]
    for j in (1, 2):
        inside = (new >= past[:, j - 1]) & (new <= past[:, k - j])
        assert inside.mean() == pytest.approx(structures.interval_coverage(k, j), abs=0.005)


def test_label_maps_on_disk_give_the_same_rows(tmp_path):
    from nnunet_varaug.evaluation.chunked import LabelMaps
    from nnunet_varaug.evaluation.lesions import lesion_rows

    maps = large_band_case(4)
    maps[2, 28:30, 1:3, 1:3] = 2
    stored = LabelMaps(str(tmp_path / "maps.raw"))
    for m in maps:
        stored.append(m)
    consensus = maps[0]
    args = ((1.0, 2.0, 1.0), ORGAN_LESION, [0.0, 0.0], [(0.1, 0.2)] * 2, [(0.3, 0.4)] * 2)
    assert structures.structure_rows(stored, consensus, *args) == structures.structure_rows(maps, consensus, *args)
    mi = np.zeros(consensus.shape, np.float32)
    assert lesion_rows(stored, maps[2], mi, (1, 1, 1), ORGAN_LESION[1]) == lesion_rows(maps, maps[2], mi, (1, 1, 1),
                                                                                        ORGAN_LESION[1])
