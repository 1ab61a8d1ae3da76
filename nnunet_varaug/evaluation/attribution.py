"""Which source of randomness drives the replicas' disagreement: the attribution arithmetic, in plain numpy.

Input, per source (``seed`` for the seed replicas, which change every source at once, and one entry per
one-source set: ``init``, ``order``, ``aug``, ``mca``, ``nondet``): the volume of every structure in every replica
of every case, ``(cases, structures, K)``, and each case's mean pairwise Dice, ``(cases, structures)``. Per
structure and source:

* **mean pairwise Dice**: the mean over cases of the case's mean Dice over replica pairs;
* **volume CV**: the mean over cases of ``std / mean`` of the K volumes (``ddof = 1``; cases where the structure is
  absent from every replica are left out);
* **between-replica volume variance**: the mean over cases of the K volumes' variance (``ddof = 1``, so sets of
  different K compare), and its **ratio** to the seed replicas' (``variance_ratio``): the share of the all-source
  variance that this source alone gives. A ratio of means, not a mean of ratios: cases where the seed replicas
  happen to agree would make the latter explode;
* **additivity**: the sum of the single sources' ratios. 1 means the single sources add up to the all-source
  variance; they need not (sources interact, and a training is chaotic: one changed stream can move as much as all).

Intervals are 95 % percentile bootstrap intervals over cases (:func:`bootstrap_indices`: the same resampled cases
for every source and structure, so that sums and ratios keep their pairing). They cover the uncertainty from the
choice of cases, not that from the finite number of replicas.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

REFERENCE = "seed"
"""The source every other one is compared with: the seed replicas, all sources changed at once."""

CONFIDENCE = 0.95


@dataclass(frozen=True)
class SourceRow:
    """One structure and source. ``*_interval``: (low, high) of the 95 % bootstrap interval over cases."""

    structure: str
    source: str
    cases: int
    replicas: int
    mean_pairwise_dice: float
    dice_interval: Tuple[float, float]
    volume_cv: float
    cv_interval: Tuple[float, float]
    volume_variance: float
    variance_ratio: float
    ratio_interval: Tuple[float, float]


@dataclass(frozen=True)
class Additivity:
    """One structure: the sum of the single sources' variance ratios, its interval, and the sources summed."""

    structure: str
    sources: Tuple[str, ...]
    ratio_sum: float
    interval: Tuple[float, float]


def case_variances(volumes: np.ndarray) -> np.ndarray:
    """``(cases, S, K)`` volumes -> ``(cases, S)`` between-replica variance, ``ddof = 1``."""
    volumes = np.asarray(volumes, dtype=np.float64)
    if volumes.ndim != 3 or volumes.shape[2] < 2:
        raise ValueError(f"volumes must be (cases, structures, K) with K >= 2, got shape {volumes.shape}")
    return volumes.var(axis=2, ddof=1)


def case_cvs(volumes: np.ndarray) -> np.ndarray:
    """``(cases, S, K)`` volumes -> ``(cases, S)`` coefficient of variation ``std (ddof = 1) / mean``; NaN where
    the mean is 0 (the structure absent from every replica)."""
    volumes = np.asarray(volumes, dtype=np.float64)
    mean = volumes.mean(axis=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mean > 0, np.sqrt(case_variances(volumes)) / mean, np.nan)


def bootstrap_indices(cases: int, resamples: int, seed: int = 0) -> np.ndarray:
    """``(resamples, cases)`` case indices drawn with replacement: ``np.random.default_rng(seed).integers(0,
    cases, size=(resamples, cases))``."""
    return np.random.default_rng(seed).integers(0, cases, size=(resamples, cases))


def _interval(samples: np.ndarray) -> Tuple[float, float]:
    """The percentile interval of ``samples`` (NaNs, from resamples where a value is undefined, left out)."""
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return float("nan"), float("nan")
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def _nanmean_rows(values: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``(cases,)`` values -> ``(resamples,)`` mean over each resample's cases, NaNs left out."""
    with warnings.catch_warnings():  # a resample of cases that are all NaN: "mean of empty slice"
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values[idx], axis=1)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1), np.nan)


def attribute(volumes: Mapping[str, np.ndarray], dice: Mapping[str, np.ndarray], structures: Sequence[str],
              resamples: int = 2000, seed: int = 0) -> Tuple[List[SourceRow], List[Additivity]]:
    """The attribution table: one :class:`SourceRow` per structure and source (sources in the given order), and
    one :class:`Additivity` per structure.

    Args:
        volumes: source -> ``(cases, S, K_source)`` volumes (any unit; the ratios have none). Must hold
            :data:`REFERENCE`; every source has the same cases in the same order.
        dice: source -> ``(cases, S)`` mean pairwise Dice of each case.
        structures: the S structure names.
        resamples: bootstrap resamples over cases.
        seed: the bootstrap's generator seed (:func:`bootstrap_indices`).
    """
    if REFERENCE not in volumes:
        raise ValueError(f"the attribution needs the '{REFERENCE}' replicas: every ratio is to their variance")
    shapes = {name: np.shape(v) for name, v in volumes.items()}
    n_cases = shapes[REFERENCE][0]
    for name, shape in shapes.items():
        if len(shape) != 3 or shape[0] != n_cases or shape[1] != len(structures):
            raise ValueError(f"volumes of '{name}' have shape {shape}; expected ({n_cases}, {len(structures)}, K)")
        if np.shape(dice[name]) != (n_cases, len(structures)):
            raise ValueError(f"dice of '{name}' has shape {np.shape(dice[name])}; "
                             f"expected ({n_cases}, {len(structures)})")
    idx = bootstrap_indices(n_cases, resamples, seed)
    variances = {name: case_variances(v) for name, v in volumes.items()}
    cvs = {name: case_cvs(v) for name, v in volumes.items()}
    rows, sums = [], []
    singles = tuple(name for name in volumes if name != REFERENCE)
    for s, structure in enumerate(structures):
        ref = variances[REFERENCE][:, s]
        ref_boot = ref[idx].mean(axis=1)
        ratio_boot: Dict[str, np.ndarray] = {}
        for name in volumes:
            var, cv, d = variances[name][:, s], cvs[name][:, s], np.asarray(dice[name], dtype=np.float64)[:, s]
            ratio_boot[name] = _ratio(var[idx].mean(axis=1), ref_boot)
            rows.append(SourceRow(
                structure, name, n_cases, shapes[name][2],
                float(np.nanmean(d)) if np.isfinite(d).any() else float("nan"), _interval(_nanmean_rows(d, idx)),
                float(np.nanmean(cv)) if np.isfinite(cv).any() else float("nan"), _interval(_nanmean_rows(cv, idx)),
                float(var.mean()), float(_ratio(np.array(var.mean()), np.array(ref.mean()))),
                _interval(ratio_boot[name])))
        if singles:
            total = sum(float(variances[name][:, s].mean()) for name in singles)
            boot = sum(ratio_boot[name] for name in singles)
            sums.append(Additivity(structure, singles, float(_ratio(np.array(total), np.array(ref.mean()))),
                                   _interval(boot)))
    return rows, sums


def find_row(rows: Sequence[SourceRow], structure: str, source: str) -> Optional[SourceRow]:
    """The row of ``structure`` and ``source``, or None."""
    return next((r for r in rows if r.structure == structure and r.source == source), None)
