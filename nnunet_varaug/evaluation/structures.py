"""Per-structure uncertainty of one case, and the size-aware review score (``structures.csv``).

Per case and structure s, from the K replicas' label maps, their consensus, the mean probability and the entropy and
mutual-information maps (definitions in docs/inference.md):

* **Volumes.** ``consensus_mm3`` (voxels of s in the consensus × voxel volume); ``soft_mm3`` = Σ_v p̄_s(v) × voxel
  volume, p̄_s the mean probability of s's labels (the expected volume under the ensemble's probabilities);
  ``soft_minus_consensus_mm3``; the replicas' volumes: mean, SD (ddof = 1), min and max, and the second smallest and
  second largest. For K exchangeable replicas, the probability that one more replica trained the same way has a
  volume inside ``[j-th smallest, j-th largest]`` is ``(K + 1 - 2j) / (K + 1)`` (order statistics): the min–max
  range covers ``(K - 1)/(K + 1)`` (``minmax_coverage``), the second range ``(K - 3)/(K + 1)`` (``second_coverage``,
  NaN for K < 4). It is a statement about retraining, not about the true volume.
* **Where the replicas are unsure.** Mean entropy and mutual information (bits) over the consensus structure and
  over its **boundary band**: voxels within ``BAND_MM`` (2 mm) of the consensus structure's surface, inside or
  outside (Euclidean distance in mm, the image's spacing). ``uncertain_mm3``: voxels where some but not all replicas
  hold s; ``uncertain_share`` = that / the consensus volume (NaN when the consensus has no s).
* **Detection.** ``detected_by``: how many replicas hold s at all; ``detection_share`` = that / K.
* ``mean_pairwise_dice``: Dice of every replica pair, averaged (two empty masks: 1).

**Review score** of a structure (:func:`review_score`), in [0, 1], higher = check first::

    score_s = (1 - mean_pairwise_dice_s) × min(1, V̄_s / V_min)

``V̄_s`` is the replicas' mean volume of s and ``V_min`` (``--min-volume``, default ``MIN_VOLUME_MM3`` = 100 mm³)
the smallest volume worth a reviewer's attention: disagreement about a structure smaller than ``V_min`` counts in
proportion to its size. A 1-voxel speck that one of K replicas predicts has ``V̄_s`` = 1 voxel / K and scores about
``1e-3``, far below a large structure whose replicas disagree along a wide band. A structure **every** replica leaves
empty scores 0 (agreement) when the user said it may be absent (``--may-be-absent``), else 1 (reason
``absent in all replicas``): a liver no replica finds is a failure, a lesion no replica finds is usually none.
The case's score is the largest structure score; ties are broken by the uncertain volume.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnunet_varaug.evaluation import variability
from nnunet_varaug.evaluation.calibration import padded_box

BAND_MM = 2.0
"""Half-width of the boundary band around the consensus structure's surface, in mm."""

MIN_VOLUME_MM3 = 100.0
"""Default ``V_min`` of the review score: disagreement about smaller structures is weighted by their size."""

ABSENT = "absent in all replicas"


def interval_coverage(k: int, j: int) -> float:
    """Probability that one more exchangeable replica falls in ``[j-th smallest, j-th largest]`` of K values."""
    return (k + 1 - 2 * j) / (k + 1) if k >= 2 * j else math.nan


def boundary_band(mask: np.ndarray, spacing: Sequence[float], width: float = BAND_MM) -> np.ndarray:
    """Voxels within ``width`` mm of the surface of ``mask`` (inside or outside), computed on the bounding box."""
    from scipy import ndimage

    band = np.zeros(mask.shape, dtype=bool)
    if not mask.any():
        return band
    spacing = np.asarray(spacing, dtype=np.float64)
    box = padded_box(mask, spacing, width)
    m = mask[box]
    # distance of an inside voxel to the nearest outside voxel, and vice versa (edt: distance to the nearest zero);
    # outside the image counts as outside the structure
    padded = np.pad(m, 1, constant_values=False)
    inside = ndimage.distance_transform_edt(padded, sampling=spacing)[(slice(1, -1),) * m.ndim]
    outside = ndimage.distance_transform_edt(~m, sampling=spacing) if (~m).any() else np.full(m.shape, np.inf)
    band[box] = (m & (inside <= width)) | (~m & (outside <= width))
    return band


def _mean_in(values: np.ndarray, mask: np.ndarray) -> float:
    n = int(np.count_nonzero(mask))
    return float(values[mask].sum(dtype=np.float64) / n) if n else math.nan


def soft_voxels(mean: np.ndarray, structures: Sequence[variability.Structure], channels: Sequence[int]) -> List[float]:
    """Per structure, Σ over voxels of the mean probability of its labels (channel ``i`` = label ``channels[i]``)."""
    index = list(channels)
    return [float(sum(mean[index.index(v)].sum(dtype=np.float64) for v in st.labels)) for st in structures]


def map_means(values: np.ndarray, consensus: np.ndarray, structures: Sequence[variability.Structure],
              spacing: Sequence[float]) -> List[Tuple[float, float]]:
    """Per structure, (mean of ``values`` inside the consensus structure, mean in its boundary band); NaN if empty."""
    out = []
    for st in structures:
        cons = variability.structure_mask(consensus, st.labels)
        out.append((_mean_in(values, cons), _mean_in(values, boundary_band(cons, spacing))))
    return out


def structure_rows(maps: np.ndarray, consensus: np.ndarray, spacing: Sequence[float],
                   structures: Sequence[variability.Structure], soft: Sequence[float],
                   entropy: Sequence[Tuple[float, float]], mutual_information: Sequence[Tuple[float, float]]
                   ) -> List[Dict]:
    """One row per structure (no case column; the caller adds it), columns as in the module docstring.

    Args:
        maps: ``(K, *spatial)`` replica label maps, or :class:`~nnunet_varaug.evaluation.chunked.LabelMaps` (read in
            row chunks).
        consensus: the consensus label map.
        spacing: voxel spacing in mm, in the arrays' axis order.
        structures: what to measure.
        soft: :func:`soft_voxels` of the mean probability.
        entropy, mutual_information: :func:`map_means` of the entropy and mutual-information maps (bits).
    """
    from nnunet_varaug.evaluation.uncertainty import map_chunks

    k = maps.count if hasattr(maps, "count") and not isinstance(maps, np.ndarray) else maps.shape[0]
    voxel = float(np.prod(np.asarray(spacing, dtype=np.float64)))
    overlap = np.zeros((len(structures), k, k), dtype=np.int64)
    uncertain_voxels = np.zeros(len(structures), dtype=np.int64)
    for _, _, block in map_chunks(maps):  # row chunks: the K maps are never all in memory (LabelMaps on disk)
        overlap += variability.overlap_counts(block, structures)
        for s, st in enumerate(structures):
            n = variability.structure_mask(block, st.labels).sum(axis=0, dtype=np.uint16)
            uncertain_voxels[s] += int(np.count_nonzero((n > 0) & (n < k)))
    dice = variability.dice_matrix(overlap)
    pairs = variability.pair_indices(k)
    rows = []
    for s, st in enumerate(structures):
        n_cons = int(np.count_nonzero(variability.structure_mask(consensus, st.labels)))
        vox = np.diagonal(overlap[s]).astype(np.float64)
        vol = np.sort(vox * voxel)
        uncertain = int(uncertain_voxels[s])
        rows.append({
            "label": st.key, "name": st.name, "replicas": k,
            "consensus_mm3": n_cons * voxel, "soft_mm3": soft[s] * voxel,
            "soft_minus_consensus_mm3": (soft[s] - n_cons) * voxel,
            "replica_mean_mm3": float(vol.mean()), "replica_sd_mm3": float(vol.std(ddof=1)) if k > 1 else 0.0,
            "replica_min_mm3": float(vol[0]), "replica_max_mm3": float(vol[-1]),
            "minmax_coverage": interval_coverage(k, 1),
            "replica_second_lo_mm3": float(vol[1]) if k >= 4 else math.nan,
            "replica_second_hi_mm3": float(vol[-2]) if k >= 4 else math.nan,
            "second_coverage": interval_coverage(k, 2),
            "detected_by": int(np.count_nonzero(vox)), "detection_share": float(np.count_nonzero(vox)) / k,
            "mean_pairwise_dice": float(np.mean([dice[s, a, b] for a, b in pairs])) if pairs else 1.0,
            "uncertain_mm3": uncertain * voxel, "uncertain_share": uncertain / n_cons if n_cons else math.nan,
            "entropy_in_structure_bits": entropy[s][0], "entropy_in_band_bits": entropy[s][1],
            "mi_in_structure_bits": mutual_information[s][0], "mi_in_band_bits": mutual_information[s][1],
        })
    return rows


def rows_from_arrays(maps: np.ndarray, consensus: np.ndarray, mean: np.ndarray, entropy: np.ndarray,
                     mutual_information: np.ndarray, spacing: Sequence[float],
                     structures: Sequence[variability.Structure], channels: Sequence[int]) -> List[Dict]:
    """:func:`structure_rows` from whole arrays (``mean``: ``(C, *spatial)``, channel ``i`` = ``channels[i]``)."""
    return structure_rows(maps, consensus, spacing, structures, soft_voxels(mean, structures, channels),
                          map_means(entropy, consensus, structures, spacing),
                          map_means(mutual_information, consensus, structures, spacing))


def review_score(row: Dict, min_volume: float = MIN_VOLUME_MM3, may_be_absent: bool = False) -> Tuple[float, str]:
    """(score, reason) of one ``structure_rows`` row; see the module docstring for the formula."""
    if row["detected_by"] == 0:
        return (0.0, "absent in all replicas (allowed)") if may_be_absent else (1.0, ABSENT)
    weight = min(1.0, row["replica_mean_mm3"] / min_volume) if min_volume > 0 else 1.0
    score = (1.0 - row["mean_pairwise_dice"]) * weight
    reason = "replicas disagree" if weight == 1.0 else f"replicas disagree; smaller than {min_volume:g} mm³"
    return float(score), reason


def check_structure_names(names: Sequence[str], structures: Sequence[variability.Structure], flag: str) -> None:
    """Every name given to ``flag`` is a structure of the dataset (its name or label value)."""
    known = {st.name for st in structures} | {st.key for st in structures}
    bad = [n for n in names if n not in known]
    if bad:
        listing = ", ".join(f"{st.name} ({st.key})" for st in structures)
        raise ValueError(f"{flag} {' '.join(bad)}: not a structure of this dataset; use one of {listing}")


def case_review(rows: Sequence[Dict], min_volume: float = MIN_VOLUME_MM3,
                may_be_absent: Sequence[str] = ()) -> Tuple[float, str, str, List[float]]:
    """(case score, structure that gives it, its reason, per-structure scores) for one case's rows."""
    scores, best = [], (-1.0, "", "")
    for r in rows:
        allowed = r["name"] in may_be_absent or r["label"] in may_be_absent
        score, reason = review_score(r, min_volume, allowed)
        scores.append(score)
        if score > best[0]:
            best = (score, r["name"], reason)
    return (max(best[0], 0.0), best[1], best[2], scores)


def review_table(per_case: Dict[str, List[Dict]], min_volume: float = MIN_VOLUME_MM3,
                 may_be_absent: Sequence[str] = (), flag_above: Optional[float] = None) -> List[Dict]:
    """review.csv rows, most doubtful first (score, then uncertain volume over structures, then case name)."""
    out = []
    for case, rows in per_case.items():
        score, name, reason, _ = case_review(rows, min_volume, may_be_absent)
        out.append({"case": case, "score": score, "structure": name, "reason": reason,
                    "uncertain_volume_mm3": float(sum(r["uncertain_mm3"] for r in rows)),
                    "flagged": bool(flag_above is not None and score > flag_above)})
    out.sort(key=lambda r: (-r["score"], -r["uncertain_volume_mm3"], r["case"]))
    for rank, r in enumerate(out, 1):
        r["rank"] = rank
    return out
