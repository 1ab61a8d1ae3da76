"""Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks", ICML): one temperature T per
model kind, fitted by minimising the NLL on labelled validation cases, applied to each replica before averaging.

* **Scaling.** ``softmax(z / T)`` of a replica's logits z. The probabilities nnU-Net exports are ``softmax(z)`` of
  the logits resampled to the image grid, and ``softmax(z / T) = p^(1/T) / Σ_c p_c^(1/T)``, so :func:`scale`
  applies T to those probabilities exactly (a probability that underflowed to 0 in float32 stays 0).
* **Objective.** The mean NLL ``−ln softmax(z / T)_y`` over the voxels of every labelled case and every replica of
  the kind (ignore-label voxels left out). Per case at most ``MAX_VOXELS`` voxels are used, drawn uniformly with a
  fixed seed and weighted by (case voxels / drawn voxels), so that every voxel of every case counts equally in
  expectation; smaller cases use every voxel.
* **Optimizer.** The NLL is summed on a fixed grid of ``GRID`` temperatures, log-spaced from ``T_MIN`` to ``T_MAX``
  (a ratio of 1.047 between neighbours; the sums are additive over cases, so a resumed run combines finished cases),
  then the minimum is refined by the vertex of the parabola through the grid minimum and its two neighbours, in
  ln T. A minimum at either end of the grid is reported as such (T outside [T_MIN, T_MAX] is not searched).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import numpy as np

T_MIN, T_MAX, GRID = 0.05, 20.0, 133
MAX_VOXELS = 1 << 16
NLL_FLOOR = 1e-12


def grid() -> np.ndarray:
    """The temperatures at which the NLL is summed."""
    return np.exp(np.linspace(math.log(T_MIN), math.log(T_MAX), GRID))


def scale(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """``p^(1/T)`` normalised over the class axis 0 (= ``softmax(z / T)`` for ``p = softmax(z)``), float32."""
    if temperature == 1.0:
        return probabilities
    with np.errstate(divide="ignore"):
        z = np.log(probabilities.astype(np.float32)) / np.float32(temperature)
    z -= z.max(axis=0, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=0, keepdims=True)
    return z


def nll_sums(probabilities: np.ndarray, gt: np.ndarray, labels, ignore: Optional[int] = None,
             seed: int = 0) -> Tuple[np.ndarray, float]:
    """(NLL summed over the case's voxels at each grid temperature, voxels it stands for) for one model and case."""
    keep = np.ones(gt.size, bool) if ignore is None else gt.reshape(-1) != ignore
    index = np.flatnonzero(keep)
    weight = 1.0
    if index.size > MAX_VOXELS:
        chosen = np.sort(np.random.default_rng(seed).choice(index.size, MAX_VOXELS, replace=False))
        weight = index.size / MAX_VOXELS
        index = index[chosen]
    flat = probabilities.reshape(probabilities.shape[0], -1)[:, index].astype(np.float32)
    y = np.searchsorted(np.asarray(labels), gt.reshape(-1)[index])
    logp = np.log(np.maximum(flat, np.float32(NLL_FLOOR)))
    logp -= logp.max(axis=0)  # softmax is shift-invariant: the largest log-probability becomes 0
    true = logp[y, np.arange(y.size)]
    out = np.empty(GRID)
    for i, t in enumerate(grid()):
        inv = np.float32(1.0 / t)
        lse = np.log(np.exp(logp * inv).sum(axis=0, dtype=np.float32))  # the largest term is exp(0) = 1
        out[i] = float((lse - true * inv).sum(dtype=np.float64)) * weight
    return out, float(keep.sum())


def fit(sums: np.ndarray) -> Dict[str, float]:
    """The temperature of least summed NLL (``sums`` over the grid), refined in ln T; with the NLL at T = 1 and at
    the fit, per voxel when ``voxels`` is known (see :class:`Fit`)."""
    t = grid()
    i = int(np.argmin(sums))
    at_edge = i in (0, GRID - 1)
    x = np.log(t)
    best = x[i]
    if not at_edge:
        y0, y1, y2 = sums[i - 1], sums[i], sums[i + 1]
        denom = y0 - 2 * y1 + y2
        if denom > 0:
            best = x[i] + 0.5 * (x[1] - x[0]) * (y0 - y2) / denom
    return {"temperature": float(math.exp(best)), "at_grid_edge": bool(at_edge)}


class Fit:
    """NLL sums of one kind over cases (additive), and the fit."""

    def __init__(self) -> None:
        self.sums = np.zeros(GRID)
        self.voxels = 0.0
        self.cases = 0

    def add(self, sums: np.ndarray, voxels: float) -> None:
        self.sums += np.asarray(sums, dtype=np.float64)
        self.voxels += voxels

    def result(self) -> Dict[str, float]:
        out = fit(self.sums)
        t = grid()
        one = int(np.argmin(np.abs(np.log(t))))
        out["nll_at_1"] = float(self.sums[one] / self.voxels) if self.voxels else math.nan
        out["nll_at_fit"] = float(self.sums.min() / self.voxels) if self.voxels else math.nan
        return out
