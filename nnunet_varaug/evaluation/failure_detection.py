"""Does the uncertainty find the failures? Dice and normalized surface Dice to the labels, AURC, E-AURC, Spearman,
risk–coverage curves and review thresholds (``failure_detection.csv``, ``review_thresholds.csv``).

Definitions (also in docs/inference.md):

* **Dice** of the consensus to the labels per case and structure, nnU-Net's convention: NaN when both are empty
  (such units are left out and counted), voxels with the ignore label left out.
* **Normalized surface Dice** (NSD, Nikolov et al. 2021, "Clinically applicable segmentation of head and neck
  anatomy for radiotherapy", JMIR 23(7)) at a tolerance τ in mm: the share of both boundaries that lies within τ
  of the other boundary; boundary = the mask's voxels with a face neighbour outside it, Euclidean distances in mm
  with the image's spacing — the definition of MONAI's ``compute_surface_dice`` without sub-voxel surfaces. NaN
  when both are empty, 0 when one is. Computed here with scipy and tested against a brute-force k-d tree: MONAI
  itself would fit, but ``import monai`` loads its whole package (8 s on an idle 2-core machine, 90 s under load)
  in every predict/analyze process for this one function.
* **Risk** of a unit (a case, or a case × structure) = 1 − Dice, as ValUES (Kahl et al., ICLR 2024) scores
  segmentation failures. A **failure** is a Dice below ``--failure-dice`` (default 0.8).
* **Risk–coverage curve** (Geifman et al., ICLR 2019; the failure-detection protocol of Jaeger et al., ICLR 2023):
  rank the n units from least to most uncertain; at coverage m/n keep the m least uncertain and take their mean
  risk, the *selective risk* R_m. Units with equal uncertainty are kept or dropped together, each counted at the
  group's mean risk (the expectation over orderings within the group).
* **AURC** = (1/n) Σ_{m=1..n} R_m, the area under that curve over the n coverage levels. Lower is better.
* **E-AURC** = AURC − AURC*, AURC* the same sum with the units ranked by their risk itself (the best any
  uncertainty could do with these segmentations); 0 when the uncertainty orders the units exactly by Dice. The
  same estimator on both sides makes E-AURC exactly 0 there (fd-shifts' trapezoidal AURC minus the closed-form
  AURC* is not). ``aurc_random`` = the mean risk, the expected AURC of a random ranking.
* **Spearman's ρ** between the uncertainty and the Dice (``scipy.stats.spearmanr``): negative when more uncertain
  units have lower Dice.
* **Review thresholds**: for a share s of the failures, the smallest review-score threshold t such that reviewing
  every case with score ≥ t catches at least s of the failing cases; with the number of cases to review and the
  false alarms among them.
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

FAILURE_DICE = 0.8
"""Default Dice below which a segmentation counts as a failure."""

NSD_TOLERANCE_MM = 2.0
"""Default tolerance of the normalized surface Dice, in mm."""

SHARES = (0.5, 0.8, 0.9, 1.0)
"""Shares of the failures for which the review thresholds are reported."""

SUMMARIES = (("review_score", "review score"), ("mi_in_structure_bits", "mean MI in the structure"),
             ("uncertain_mm3", "uncertain volume"), ("soft_hard_gap_mm3", "|soft − consensus volume|"))
"""Uncertainty summaries scored per structure: (column of the units table, how the report names it)."""


# ---- per case and structure -------------------------------------------------------------------------------------
def dice(pred: np.ndarray, gt: np.ndarray, valid: Optional[np.ndarray] = None) -> float:
    """Dice of two boolean masks on the ``valid`` voxels; NaN when both are empty (nnU-Net's convention)."""
    if valid is not None:
        pred, gt = pred & valid, gt & valid
    denom = int(np.count_nonzero(pred)) + int(np.count_nonzero(gt))
    return 2.0 * int(np.count_nonzero(pred & gt)) / denom if denom else math.nan


def boundary(mask: np.ndarray) -> np.ndarray:
    """The mask's voxels with a face neighbour outside it (or outside the image)."""
    from scipy import ndimage

    inner = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1), border_value=0)
    return mask & ~inner


def normalized_surface_dice(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float],
                            tolerance_mm: float = NSD_TOLERANCE_MM) -> float:
    """NSD of two boolean masks at ``tolerance_mm`` (``spacing`` in the arrays' axis order): the boundary voxels of
    each mask within the tolerance of the other's boundary, over all boundary voxels; Euclidean distances between
    voxel centres in mm (``scipy.ndimage.distance_transform_edt``), computed on the masks' joint bounding box. The
    definition of MONAI's ``compute_surface_dice`` (``use_subvoxels=False``). NaN when both are empty, 0 when one
    is."""
    from scipy import ndimage

    if not pred.any() and not gt.any():
        return math.nan
    if not pred.any() or not gt.any():
        return 0.0
    idx = np.nonzero(pred | gt)
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in idx)
    bp, bg = boundary(pred[box]), boundary(gt[box])
    spacing = [float(s) for s in spacing]
    to_gt = ndimage.distance_transform_edt(~bg, sampling=spacing)[bp]
    to_pred = ndimage.distance_transform_edt(~bp, sampling=spacing)[bg]
    return float((np.count_nonzero(to_gt <= tolerance_mm) + np.count_nonzero(to_pred <= tolerance_mm))
                 / (to_gt.size + to_pred.size))


def label_agreement(consensus: np.ndarray, gt: np.ndarray, spacing: Sequence[float], structures,
                    ignore: Optional[int] = None, tolerance_mm: float = NSD_TOLERANCE_MM) -> List[Dict]:
    """Per structure, the consensus's Dice and NSD to the labels (``structures``: variability.Structure)."""
    from nnunet_varaug.evaluation.variability import structure_mask

    valid = None if ignore is None else gt != ignore
    rows = []
    for st in structures:
        pred, true = structure_mask(consensus, st.labels), structure_mask(gt, st.labels)
        if valid is not None:
            pred, true = pred & valid, true & valid
        rows.append({"label": st.key, "name": st.name, "dice": dice(pred, true),
                     "nsd": normalized_surface_dice(pred, true, spacing, tolerance_mm), "nsd_tolerance_mm": tolerance_mm})
    return rows


# ---- ranking metrics ----------------------------------------------------------------------------------------------
def _ranked_risks(risk: np.ndarray, uncertainty: np.ndarray) -> np.ndarray:
    """Risks ordered from least to most uncertain, each tie group replaced by its mean risk."""
    order = np.argsort(uncertainty, kind="stable")
    u, r = uncertainty[order], risk[order].astype(np.float64)
    out = r.copy()
    start = 0
    for i in range(1, len(u) + 1):
        if i == len(u) or u[i] != u[start]:
            out[start:i] = r[start:i].mean()
            start = i
    return out


def risk_coverage(risk: Sequence[float], uncertainty: Sequence[float]) -> Tuple[np.ndarray, np.ndarray]:
    """(coverage m/n for m = 1..n, selective risk R_m): the mean risk of the m least uncertain units."""
    risk, uncertainty = np.asarray(risk, dtype=np.float64), np.asarray(uncertainty, dtype=np.float64)
    ranked = _ranked_risks(risk, uncertainty)
    m = np.arange(1, len(ranked) + 1)
    return m / len(ranked), np.cumsum(ranked) / m


def aurc(risk: Sequence[float], uncertainty: Sequence[float]) -> float:
    """``(1/n) Σ_m R_m`` (module docstring); NaN without units."""
    if len(risk) == 0:
        return math.nan
    return float(risk_coverage(risk, uncertainty)[1].mean())


def eaurc(risk: Sequence[float], uncertainty: Sequence[float]) -> float:
    """AURC minus the AURC of the oracle ranking (units ranked by their own risk)."""
    return aurc(risk, uncertainty) - aurc(risk, risk)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's ρ (scipy), NaN with fewer than 3 units or a constant input."""
    from scipy import stats

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size < 3 or np.all(x == x[0]) or np.all(y == y[0]):
        return math.nan
    return float(stats.spearmanr(x, y).statistic)


def review_thresholds(score: Sequence[float], failed: Sequence[bool], shares: Sequence[float] = SHARES) -> List[Dict]:
    """Per share s: the threshold t, cases with score ≥ t (to review), failures caught, false alarms."""
    score, failed = np.asarray(score, dtype=np.float64), np.asarray(failed, dtype=bool)
    total = int(failed.sum())
    rows = []
    for share in shares:
        row = {"share_of_failures": share, "failures": total, "cases": int(score.size)}
        if total == 0:
            rows.append({**row, "threshold": math.nan, "cases_to_review": 0, "failures_caught": 0, "false_alarms": 0})
            continue
        for t in np.unique(score)[::-1]:  # thresholds from the highest score down
            flagged = score >= t
            caught = int((flagged & failed).sum())
            if caught >= share * total - 1e-9:
                rows.append({**row, "threshold": float(t), "cases_to_review": int(flagged.sum()),
                             "failures_caught": caught, "false_alarms": int((flagged & ~failed).sum())})
                break
    return rows


# ---- tables -------------------------------------------------------------------------------------------------------
def score_rows(level: str, units: Sequence[Dict], columns: Sequence[Tuple[str, str]],
               failure_dice: float = FAILURE_DICE) -> List[Dict]:
    """failure_detection.csv rows of one level: per uncertainty column, AURC, E-AURC, Spearman with Dice."""
    kept = [u for u in units if np.isfinite(u["dice"])]
    risk = np.array([1.0 - u["dice"] for u in kept])
    dices = np.array([u["dice"] for u in kept])
    rows = []
    for column, title in columns:
        values = np.array([u[column] for u in kept], dtype=np.float64)
        ok = np.isfinite(values)
        rows.append({"level": level, "summary": column, "description": title, "units": int(ok.sum()),
                     "left_out_no_dice": len(units) - len(kept), "left_out_no_value": int((~ok).sum()),
                     "failures": int((dices[ok] < failure_dice).sum()), "failure_dice": failure_dice,
                     "mean_dice": float(dices[ok].mean()) if ok.any() else math.nan,
                     "aurc": aurc(risk[ok], values[ok]), "eaurc": eaurc(risk[ok], values[ok]) if ok.any() else math.nan,
                     "aurc_random": float(risk[ok].mean()) if ok.any() else math.nan,
                     "spearman_rho": spearman(values[ok], dices[ok])})
    return rows
