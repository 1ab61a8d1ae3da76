"""Per-lesion view of one structure (``--instances``): connected components of the consensus and of each replica,
matched (``lesions.csv``, ``lesion_counts.csv``).

Definitions (also in docs/inference.md):

* **Lesion**: a connected component of the structure's mask, full connectivity (26 neighbours in 3D, 8 in 2D:
  ``scipy.ndimage.generate_binary_structure(ndim, ndim)``), in the consensus and, separately, in each replica.
* **Match**: replica k *finds* consensus lesion L when one of k's lesions overlaps L by at least one voxel. Its
  volume for L is the summed volume of k's lesions that overlap L (a replica may split L in two). A replica lesion
  that overlaps no consensus lesion is *unmatched* (a lesion some replicas see and the consensus does not).
* Per consensus lesion: ``detected_by`` = k, ``detection_frequency`` = k/K, its consensus volume, the finding
  replicas' volumes (min, mean, max), the mean mutual information inside it (bits) and its centre (voxel indices).
* Per case: the consensus's lesion count, each replica's count (min, median, max and the list), how many consensus
  lesions all K replicas find and how many only one does, and the unmatched replica lesions.
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import numpy as np

from nnunet_varaug.evaluation import variability


def components(mask: np.ndarray) -> Tuple[np.ndarray, int]:
    """``scipy.ndimage.label`` with full connectivity: (labels, count)."""
    from scipy import ndimage

    return ndimage.label(mask, structure=ndimage.generate_binary_structure(mask.ndim, mask.ndim))


def _overlap(a: np.ndarray, na: int, b: np.ndarray, nb: int) -> np.ndarray:
    """``(na + 1, nb + 1)`` voxel counts of every (component of a, component of b) pair, 0 = background."""
    both = (a > 0) & (b > 0)
    code = a[both].astype(np.int64) * (nb + 1) + b[both]
    return np.bincount(code, minlength=(na + 1) * (nb + 1)).reshape(na + 1, nb + 1)


def lesion_rows(maps: np.ndarray, consensus: np.ndarray, mutual_information: np.ndarray,
                spacing: Sequence[float], structure: variability.Structure) -> Tuple[List[Dict], Dict]:
    """(one row per consensus lesion, one row of counts) for one structure of one case (no case column). ``maps``:
    ``(K, *spatial)`` or a LabelMaps (one replica's map read at a time)."""
    from scipy import ndimage

    k = maps.shape[0] if isinstance(maps, np.ndarray) else maps.count
    voxel = float(np.prod(np.asarray(spacing, dtype=np.float64)))
    cons, n = components(variability.structure_mask(consensus, structure.labels))
    cons_size = np.bincount(cons.ravel(), minlength=n + 1)
    found = np.zeros((k, n + 1), dtype=bool)
    volume = np.zeros((k, n + 1))
    counts, unmatched = [], []
    for i in range(k):
        one = maps[i] if isinstance(maps, np.ndarray) else maps.rows(0, consensus.shape[0], [i])[0]
        lab, m = components(variability.structure_mask(one, structure.labels))
        size = np.bincount(lab.ravel(), minlength=m + 1)
        ov = _overlap(cons, n, lab, m)[:, 1:] > 0  # (n + 1, m): consensus lesion j meets replica lesion
        found[i] = ov.any(axis=1)
        volume[i] = (ov * size[1:][None, :]).sum(axis=1) * voxel
        counts.append(m)
        unmatched.append(int(np.count_nonzero(~ov[1:].any(axis=0))) if m else 0)
    index = np.arange(1, n + 1)
    mi = ndimage.mean(mutual_information, cons, index) if n else []
    centres = ndimage.center_of_mass(cons > 0, cons, index) if n else []
    rows = []
    for j in range(1, n + 1):
        by = found[:, j]
        v = volume[by, j]
        rows.append({"label": structure.key, "name": structure.name, "lesion": j,
                     "volume_mm3": float(cons_size[j]) * voxel, "detected_by": int(by.sum()),
                     "detection_frequency": float(by.sum()) / k,
                     "replica_volume_min_mm3": float(v.min()) if v.size else math.nan,
                     "replica_volume_mean_mm3": float(v.mean()) if v.size else math.nan,
                     "replica_volume_max_mm3": float(v.max()) if v.size else math.nan,
                     "mi_mean_bits": float(mi[j - 1]),
                     "centre_voxel": " ".join(f"{c:.1f}" for c in centres[j - 1])})
    per_lesion = found[:, 1:].sum(axis=0)
    count_row = {"label": structure.key, "name": structure.name, "replicas": k, "consensus_lesions": n,
                 "replica_lesions_min": int(min(counts)), "replica_lesions_median": float(np.median(counts)),
                 "replica_lesions_max": int(max(counts)), "replica_lesions": " ".join(map(str, counts)),
                 "found_by_all": int(np.count_nonzero(per_lesion == k)),
                 "found_by_one": int(np.count_nonzero(per_lesion == 1)),
                 "unmatched_replica_lesions": int(sum(unmatched))}
    return rows, count_row
