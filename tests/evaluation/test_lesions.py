"""Lesion matching (nnunet_varaug.evaluation.lesions) on planted lesions, against scipy.ndimage.label."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from nnunet_varaug.evaluation import lesions
from nnunet_varaug.evaluation.variability import Structure

pytestmark = pytest.mark.unit

LESION = Structure("lesion", (2,))
K = 4


def planted():
    """Lesion A (a 3x3x3 cube) in every replica, lesion B (2 voxels touching only at a corner) in replica 2 only,
    lesion C in replicas 0 and 1 where replica 1 splits it in two; consensus = A and C."""
    maps = np.zeros((K, 16, 16, 16), np.uint8)
    maps[:, 1:4, 1:4, 1:4] = 2                      # A, everywhere
    maps[2, 10, 10, 10] = maps[2, 11, 11, 11] = 2    # B, one replica, diagonal neighbours
    maps[0, 8:10, 2:6, 2:4] = 2                      # C in replica 0 (16 voxels)
    maps[1, 8:10, 2:3, 2:4] = maps[1, 8:10, 5:6, 2:4] = 2  # C split in two by replica 1 (8 voxels)
    consensus = np.zeros((16, 16, 16), np.uint8)
    consensus[1:4, 1:4, 1:4] = 2
    consensus[8:10, 2:6, 2:4] = 2
    return maps, consensus


def test_planted_lesions_are_matched_as_scipy_labels_them():
    maps, consensus = planted()
    mi = np.random.default_rng(0).random(consensus.shape).astype(np.float32)
    spacing = (1.0, 2.0, 0.5)
    rows, counts = lesions.lesion_rows(maps, consensus, mi, spacing, LESION)
    full = ndimage.generate_binary_structure(3, 3)
    cons, n = ndimage.label(consensus == 2, structure=full)
    assert n == 2 and len(rows) == 2
    per_replica = [ndimage.label(m == 2, structure=full) for m in maps]
    assert counts["replica_lesions"] == " ".join(str(c) for _, c in per_replica) == "2 3 2 1"  # C split in replica 1; B (diagonal) one lesion
    for row in rows:
        j = row["lesion"]
        inside = cons == j
        finders = [i for i, (lab, _) in enumerate(per_replica) if (lab[inside] > 0).any()]
        assert row["detected_by"] == len(finders) and row["detection_frequency"] == len(finders) / K
        assert row["volume_mm3"] == inside.sum() * 1.0
        assert row["mi_mean_bits"] == pytest.approx(mi[inside].mean(), rel=1e-6)
        vols = []
        for i in finders:
            lab, _ = per_replica[i]
            touched = np.setdiff1d(np.unique(lab[inside]), [0])
            vols.append(np.isin(lab, touched).sum() * 1.0)
        assert row["replica_volume_min_mm3"] == min(vols) and row["replica_volume_max_mm3"] == max(vols)
    a, c = rows  # scipy numbers A first (scan order)
    assert a["detected_by"] == K and c["detected_by"] == 2
    assert c["replica_volume_min_mm3"] == 8.0 and c["replica_volume_max_mm3"] == 16.0  # both halves counted
    assert counts["found_by_all"] == 1 and counts["found_by_one"] == 0
    assert counts["unmatched_replica_lesions"] == 1  # B: replica 2 sees it, the consensus does not
    assert counts["consensus_lesions"] == 2 and counts["replica_lesions_median"] == 2.0


def test_a_lesion_found_by_one_replica_of_k():
    maps, consensus = planted()
    consensus[10, 10, 10] = consensus[11, 11, 11] = 2  # now the consensus holds B too
    rows, counts = lesions.lesion_rows(maps, consensus, np.zeros(consensus.shape, np.float32), (1, 1, 1), LESION)
    b = [r for r in rows if r["volume_mm3"] == 2.0]
    assert len(b) == 1 and b[0]["detected_by"] == 1 and b[0]["detection_frequency"] == 1 / K
    assert counts["found_by_one"] == 1 and counts["unmatched_replica_lesions"] == 0
    maps[3, 11, 11, 11] = 2  # one voxel of B: an overlap of one voxel is a match
    rows, counts = lesions.lesion_rows(maps, consensus, np.zeros(consensus.shape, np.float32), (1, 1, 1), LESION)
    b = [r for r in rows if r["volume_mm3"] == 2.0][0]
    assert b["detected_by"] == 2 and b["replica_volume_min_mm3"] == 1.0 and counts["found_by_one"] == 0


def test_no_lesion_anywhere():
    maps = np.zeros((K, 5, 5, 5), np.uint8)
    rows, counts = lesions.lesion_rows(maps, maps[0], np.zeros((5, 5, 5), np.float32), (1, 1, 1), LESION)
    assert rows == [] and counts["consensus_lesions"] == 0 and counts["replica_lesions_max"] == 0
