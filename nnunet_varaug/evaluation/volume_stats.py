"""Volume spread over K replicas, per case: CV, significant digits, unanimity, and the bound's probability.

Significant digits come from the ``significantdigits`` package (general method: no distribution assumed,
relative error). Three conventions make the per-structure summary trustworthy (docs/variability.md):

* **Reference.** The replicas' mean by default; when the IEEE model (``<Base>_ieee``, the unperturbed twin of
  numerical replicas) was predicted too, its volume — the "exact" value whose digits the replicas keep.
* **Unanimous cases.** When every replica gives the same volume (and, with an IEEE reference, the same as it),
  the package returns the float64 limit (52 bits); that number says nothing about the segmentation, so such
  cases are flagged and counted, never averaged.
* **Cap.** A volume counted in voxels resolves one voxel in ``n``: the smallest non-zero relative error between
  replicas is about ``1 / (2n)`` (half of the replicas one voxel away from the others), so no case can have
  more than ``floor(log2 n) + 1`` significant bits, ``n`` the largest voxel count among the replicas
  (:func:`bits_cap`; ``tests/evaluation/test_variability.py`` checks that the package never exceeds it). Per case,
  bits are capped there, digits at ``cap * log10 2``.

**What the bound means.** For the general method, the package's ``probability_estimation_bernoulli`` gives the
probability lower bound of the result from the number of samples (Sohier et al. 2021, "Confidence intervals for
stochastic arithmetic", ACM TOMS 47(2)): with all ``n`` samples within the bound, ``p = 1 + ln(1 - c) / n`` at
confidence ``c``. Here ``n = K`` (each replica is compared with the reference). :func:`bound_probability`
calls the package; ``significantdigits.minimum_number_of_trials`` gives the K needed for a target, from the
exact binomial bound ``K = ceil(ln(1 - c) / ln p)`` (59 for 95 % / 95 %; the linearised formula above gives
0.949 at K = 59, so the two are quoted by name, not inverted into each other).
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, Optional, Tuple

import numpy as np

CONFIDENCE = 0.95
"""The confidence at which the report states the probability of the general method's bound."""


def significant_digits(volumes: np.ndarray, reference: Optional[np.ndarray] = None
                       ) -> Tuple[np.ndarray, np.ndarray]:
    """Significant bits and decimal digits of each column of ``(K, cases)`` volumes across the K replicas.

    Through the ``significantdigits`` package: general method, relative error, reference = ``reference`` (one
    value per column, e.g. the IEEE model's volumes) or the replicas' mean. **Empty against non-empty is 0 bits**:
    a reference of 0 with some replica non-empty, or every replica empty with a non-zero reference (the worst
    disagreement there is; not a NaN that would drop the case). A column where the reference and every replica are
    0 (the structure absent everywhere) is NaN: there is nothing to measure. Unanimous columns come back as the
    package gives them (52 bits): use :func:`volume_spread` for summaries.
    """
    import significantdigits as sd

    volumes = np.asarray(volumes, dtype=np.float64)
    ref = volumes.mean(axis=0) if reference is None else np.asarray(reference, dtype=np.float64)
    replicas_empty = np.all(volumes == 0, axis=0)
    empty_vs_not = ((ref == 0) & ~replicas_empty) | ((ref != 0) & replicas_empty)
    out = []
    for basis in (2, 10):
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            value = sd.significant_digits(volumes, reference=ref, axis=0, basis=basis,
                                          method=sd.Method.General, error=sd.Error.Relative)
        value = np.asarray(value, dtype=np.float64).reshape(ref.shape)
        out.append(np.where(empty_vs_not, 0.0, np.where(ref == 0, np.nan, value)))
    return out[0], out[1]


def bits_cap(voxels: np.ndarray) -> np.ndarray:
    """``floor(log2 n) + 1`` per column of ``(K, cases)`` voxel counts, ``n`` the column's largest count (NaN when
    every replica is empty): the most significant bits a volume of ``n`` voxels can carry."""
    n = np.asarray(voxels, dtype=np.float64).max(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(n > 0, np.floor(np.log2(np.where(n > 0, n, 1.0))) + 1.0, np.nan)


def unanimous(volumes: np.ndarray, reference: Optional[np.ndarray] = None) -> np.ndarray:
    """Per column of ``(K, cases)`` volumes: every replica gives the same volume (and the reference's, if given),
    and it is not 0."""
    volumes = np.asarray(volumes, dtype=np.float64)
    same = np.all(volumes == volumes[0], axis=0)
    if reference is not None:
        same &= volumes[0] == np.asarray(reference, dtype=np.float64)
    return same & (volumes[0] != 0)


def bound_probability(k: int, confidence: float = CONFIDENCE) -> float:
    """The probability, at ``confidence``, with which the general method's significant digits hold for K samples
    all within the bound (``significantdigits.probability_estimation_bernoulli(K, K, confidence)``)."""
    import significantdigits as sd

    return float(sd.probability_estimation_bernoulli(k, k, confidence))


def trials_needed(probability: float = 0.95, confidence: float = CONFIDENCE) -> int:
    """The number of replicas the general method needs for ``probability`` at ``confidence`` (the package's
    ``minimum_number_of_trials``)."""
    import significantdigits as sd

    return int(sd.minimum_number_of_trials(probability, confidence))


def volume_spread(volumes: np.ndarray, voxels: Optional[np.ndarray] = None,
                  reference: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    """Per column of ``(K, cases)`` volumes: replica mean, standard deviation (ddof=1), coefficient of variation
    (std / mean; NaN where the mean is 0), significant bits and digits, ``unanimous`` and ``bits_cap``.

    ``sig_bits``/``sig_digits`` are NaN for unanimous cases (never 52) and capped by the voxel count (``voxels``:
    the same ``(K, cases)`` in voxels; without it, no cap). ``reference``: per-case reference volumes (IEEE).
    """
    volumes = np.asarray(volumes, dtype=np.float64)
    mean = volumes.mean(axis=0)
    std = volumes.std(axis=0, ddof=1) if volumes.shape[0] > 1 else np.zeros_like(mean)
    with np.errstate(invalid="ignore", divide="ignore"):
        cv = np.where(mean > 0, std / np.where(mean > 0, mean, 1.0), np.nan)
    bits, digits = significant_digits(volumes, reference)
    same = unanimous(volumes, reference)
    cap = bits_cap(voxels) if voxels is not None else np.full(mean.shape, np.inf)
    bits = np.where(same, np.nan, np.where(bits == 0, 0.0, np.minimum(bits, cap)))  # 0 bits need no cap (empty)
    digits = np.where(same, np.nan, np.where(digits == 0, 0.0, np.minimum(digits, cap * math.log10(2))))
    return {"mean": mean, "std": std, "cv": cv, "sig_bits": bits, "sig_digits": digits, "unanimous": same,
            "bits_cap": cap}


def summarize_digits(spread: Dict[str, np.ndarray]) -> Dict[str, float]:
    """Per-structure summary of :func:`volume_spread`'s per-case values.

    ``sig_bits_mean``/``sig_digits_mean``: mean over non-unanimous cases (capped). ``sig_bits_median``/
    ``sig_digits_median``: median over all cases with a defined value, a unanimous case counting as its cap (the
    most the voxel count allows; never 52); ``sig_cases``: how many cases carry a value there (a structure absent
from every replica and the reference has none). ``unanimous_cases``: how many cases were unanimous.
    """
    out: Dict[str, float] = {}
    same = spread["unanimous"]
    for name, scale in (("sig_bits", 1.0), ("sig_digits", math.log10(2))):
        value = spread[name]
        out[f"{name}_mean"] = float(np.nanmean(value)) if np.isfinite(value).any() else math.nan
        with_cap = np.where(same, spread["bits_cap"] * scale, value)
        finite = with_cap[np.isfinite(with_cap)]
        out[f"{name}_median"] = float(np.median(finite)) if finite.size else math.nan
        if name == "sig_bits":
            out["sig_cases"] = int(finite.size)
    out["unanimous_cases"] = int(np.count_nonzero(same))
    return out
