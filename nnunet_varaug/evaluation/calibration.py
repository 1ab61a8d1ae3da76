"""Voxel-wise calibration of replicas and their ensemble: ECE (one-vs-rest per label), Brier score, reliability.

Definitions (also in docs/inference.md):

* For label ``c`` a voxel's **confidence** is the model's probability ``p_c`` of that label and its **outcome**
  ``y_c = 1`` when the ground truth is ``c`` (one-vs-rest). Every voxel of the input grid counts, except voxels
  with the dataset's ignore label in the ground truth.
* **Binning**: ``BINS = 10`` equal-width bins of ``[0, 1]``; bin ``b`` holds ``b/10 <= p < (b+1)/10``, and
  ``p = 1`` falls in the last bin.
* **ECE** (expected calibration error, Guo et al. 2017, "On Calibration of Modern Neural Networks", eq. 3,
  applied per label one-vs-rest): ``Σ_b (n_b / N) |mean(y) in b - mean(p) in b|``.
* **Brier score** per label: ``mean (p_c - y_c)^2`` over the counted voxels; the multi-class Brier score (Brier
  1950) is the sum of the per-label ones over all labels, background included (reported as label ``all``).

Counts are accumulated per case (:class:`CalibrationCounts`, additive and JSON-serialisable), so a resumed run
combines finished cases without their probabilities.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

BINS = 10


class CalibrationCounts:
    """Per model and label: voxel count, sum of confidence, sum of outcome per bin, and the squared-error sum."""

    def __init__(self, labels: Sequence[int], bins: int = BINS) -> None:
        self.labels = [int(v) for v in labels]
        self.bins = bins
        self.data: Dict[str, np.ndarray] = {}  # model -> (L, bins, 3) float64 [n, sum p, sum y]
        self.squared: Dict[str, np.ndarray] = {}  # model -> (L,) float64 sum (p - y)^2

    def add(self, model: str, probabilities: np.ndarray, gt: np.ndarray, ignore: Optional[int] = None) -> None:
        """Add one case: ``(C, *spatial)`` probabilities (channel ``i`` = ``labels[i]``), ``spatial`` ground truth."""
        if probabilities.shape[0] != len(self.labels) or probabilities.shape[1:] != gt.shape:
            raise ValueError(f"probabilities {probabilities.shape} do not match {len(self.labels)} labels and "
                             f"ground truth {gt.shape}")
        keep = None if ignore is None else (gt != ignore).reshape(-1)
        data = self.data.setdefault(model, np.zeros((len(self.labels), self.bins, 3)))
        sq = self.squared.setdefault(model, np.zeros(len(self.labels)))
        g = gt.reshape(-1) if keep is None else gt.reshape(-1)[keep]
        for i, label in enumerate(self.labels):
            p = probabilities[i].reshape(-1)
            if keep is not None:
                p = p[keep]
            p = p.astype(np.float64)
            y = (g == label).astype(np.float64)
            b = np.minimum((p * self.bins).astype(np.int64), self.bins - 1)
            data[i, :, 0] += np.bincount(b, minlength=self.bins)
            data[i, :, 1] += np.bincount(b, weights=p, minlength=self.bins)
            data[i, :, 2] += np.bincount(b, weights=y, minlength=self.bins)
            sq[i] += float(np.sum((p - y) ** 2))

    def merge(self, other: "CalibrationCounts") -> None:
        for model, d in other.data.items():
            if model in self.data:
                self.data[model] += d
                self.squared[model] += other.squared[model]
            else:
                self.data[model] = d.copy()
                self.squared[model] = other.squared[model].copy()

    def to_json(self) -> dict:
        return {"labels": self.labels, "bins": self.bins,
                "data": {m: d.tolist() for m, d in self.data.items()},
                "squared": {m: s.tolist() for m, s in self.squared.items()}}

    @classmethod
    def from_json(cls, d: dict) -> "CalibrationCounts":
        out = cls(d["labels"], d["bins"])
        out.data = {m: np.asarray(v, dtype=np.float64) for m, v in d["data"].items()}
        out.squared = {m: np.asarray(v, dtype=np.float64) for m, v in d["squared"].items()}
        return out

    # ---- metrics ------------------------------------------------------------------------------------------------
    def ece(self, model: str) -> np.ndarray:
        """``(L,)`` ECE per label."""
        d = self.data[model]
        n = d[..., 0]
        total = n.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            gap = np.abs(d[..., 2] - d[..., 1])  # n_b |acc_b - conf_b| = |sum y - sum p|
            return np.where(total > 0, gap.sum(axis=1) / total, np.nan)

    def brier(self, model: str) -> np.ndarray:
        """``(L,)`` one-vs-rest Brier score per label."""
        total = self.data[model][..., 0].sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, self.squared[model] / total, np.nan)

    def reliability(self, model: str, label_index: int):
        """(mean confidence, observed frequency, voxel count) per non-empty bin of one label."""
        d = self.data[model][label_index]
        keep = d[:, 0] > 0
        return d[keep, 1] / d[keep, 0], d[keep, 2] / d[keep, 0], d[keep, 0]

    def rows(self, names: Optional[Dict[int, str]] = None) -> List[dict]:
        """calibration.csv rows: per model and label, plus the multi-class Brier score as label ``all``."""
        names = names or {}
        rows = []
        for model in self.data:
            ece, brier = self.ece(model), self.brier(model)
            voxels = self.data[model][0, :, 0].sum()
            for i, label in enumerate(self.labels):
                rows.append({"model": model, "label": str(label), "name": names.get(label, str(label)),
                             "voxels": int(voxels), "ece": float(ece[i]), "brier": float(brier[i])})
            rows.append({"model": model, "label": "all", "name": "all labels", "voxels": int(voxels),
                         "ece": float("nan"), "brier": float(np.nansum(brier))})
        return rows
