"""Voxel-wise calibration of replicas and their ensemble, stated exactly: class-wise ECE, top-label ECE, NLL and
Brier score, each over all voxels and over a region of interest.

Definitions (also in docs/inference.md). A voxel's probabilities ``p_c`` (one per label value c, the model's
softmax in the image grid) and its label ``y``; voxels with the dataset's ignore label are left out.

* **Binning**: ``BINS = 10`` equal-width bins of [0, 1]; bin b holds ``b/10 <= p < (b+1)/10``, p = 1 in the last.
* **Class-wise ECE** per label c (one-vs-rest: confidence ``p_c``, outcome ``[y = c]``):
  ``Σ_b (n_b / N) |mean outcome in b − mean p_c in b|`` — the class-wise calibration error of Kull et al. 2019
  ("Beyond temperature scaling", NeurIPS) and Nixon et al. 2019 ("Measuring calibration in deep learning", CVPR
  workshops), one value per label.
* **Top-label ECE** (Guo et al. 2017, "On Calibration of Modern Neural Networks", ICML, eq. 3): confidence
  ``max_c p_c``, outcome ``[argmax_c p_c = y]``, same bins, one value per model.
* **NLL**: mean ``−ln p_y`` in nats (``p_y`` clipped below at ``NLL_FLOOR``).
* **Brier score** (Brier 1950): per label the mean ``(p_c − [y = c])²``; the multi-class score sums it over all
  labels, background included (row ``label = all``).
* **Scopes.** ``all``: every voxel of the image grid. ``roi``: the voxels where the model's own segmentation (argmax)
  or the label is foreground, dilated by ``ROI_MARGIN_MM`` (5 mm, Euclidean in the image's spacing). Over all
  voxels a label's figures shrink with its prevalence (padding an image with perfect background divides its ECE and
  Brier score); within the ROI they do not. The ROI is per model so that every count is added in the one pass in
  which the model's probabilities exist (K probability maps are never held): a single replica's ROI does not
  include voxels only other replicas call foreground; the ensemble's ROI uses the consensus.

Counts are accumulated per case (:class:`CalibrationCounts`, additive and JSON-serialisable).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

BINS = 10
ROI_MARGIN_MM = 5.0
NLL_FLOOR = 1e-12
SCOPES = ("all", "roi")


def roi_mask(foreground: np.ndarray, spacing: Sequence[float], margin_mm: float = ROI_MARGIN_MM) -> np.ndarray:
    """``foreground`` dilated by ``margin_mm`` (voxels whose centre lies within the margin of a foreground voxel's
    centre), computed on the padded bounding box."""
    from scipy import ndimage

    out = np.zeros(foreground.shape, dtype=bool)
    if not foreground.any():
        return out
    spacing = np.asarray(spacing, dtype=np.float64)
    box = padded_box(foreground, spacing, margin_mm)
    out[box] = ndimage.distance_transform_edt(~foreground[box], sampling=spacing) <= margin_mm
    return out


def padded_box(mask: np.ndarray, spacing: np.ndarray, margin_mm: float) -> Tuple[slice, ...]:
    """The bounding box of a non-empty ``mask`` widened by ``margin_mm`` plus one voxel on each side (``spacing`` in
    mm per axis), clipped to the array: every voxel within the margin of the mask lies inside it."""
    pad = np.ceil(margin_mm / spacing).astype(int) + 1
    idx = np.nonzero(mask)
    return tuple(slice(max(0, int(i.min()) - p), min(n, int(i.max()) + p + 1))
                 for i, p, n in zip(idx, pad, mask.shape))


def model_roi(probabilities: np.ndarray, gt: np.ndarray, labels: Sequence[int], spacing: Sequence[float],
              ignore: Optional[int] = None, margin_mm: float = ROI_MARGIN_MM) -> np.ndarray:
    """The ``roi`` scope of one model and case: where its argmax or the label is foreground (not ``labels[0]``,
    not the ignore label), dilated by ``margin_mm``. Needs the whole case (the dilation crosses any chunking)."""
    background = labels[0]
    fg = np.asarray(labels)[np.argmax(probabilities, axis=0)] != background
    fg |= (gt != background) if ignore is None else (gt != background) & (gt != ignore)
    return roi_mask(fg, spacing, margin_mm)


def _binned(p: np.ndarray, y: np.ndarray, bins: int) -> np.ndarray:
    """``(bins, 3)``: voxel count, sum of confidence, sum of outcome per bin."""
    b = np.minimum((p * bins).astype(np.int64), bins - 1)
    return np.stack([np.bincount(b, minlength=bins), np.bincount(b, weights=p, minlength=bins),
                     np.bincount(b, weights=y, minlength=bins)], axis=1).astype(np.float64)


class CalibrationCounts:
    """Per scope and model: binned class-wise and top-label counts, the NLL sum, Brier sums, voxel count."""

    def __init__(self, labels: Sequence[int], bins: int = BINS) -> None:
        self.labels = [int(v) for v in labels]
        self.bins = bins
        self.stats: Dict[str, Dict[str, dict]] = {s: {} for s in SCOPES}

    @property
    def models(self) -> List[str]:
        return list(self.stats["all"])

    def add(self, model: str, probabilities: np.ndarray, gt: np.ndarray, ignore: Optional[int] = None,
            roi: Optional[np.ndarray] = None) -> None:
        """Add one case (or a chunk of one): ``(C, *spatial)`` probabilities (channel ``i`` = ``labels[i]``),
        ``spatial`` ground truth; with ``roi`` (:func:`model_roi` of the whole case, cut like the chunk) the ``roi``
        scope is counted too."""
        if probabilities.shape[0] != len(self.labels) or probabilities.shape[1:] != gt.shape:
            raise ValueError(f"probabilities {probabilities.shape} do not match {len(self.labels)} labels and "
                             f"ground truth {gt.shape}")
        keep = np.ones(gt.shape, bool) if ignore is None else gt != ignore
        self._add_scope("all", model, probabilities, gt, keep)
        if roi is not None:
            self._add_scope("roi", model, probabilities, gt, keep & roi)

    def add_case(self, model: str, probabilities: np.ndarray, gt: np.ndarray, ignore: Optional[int],
                 spacing: Sequence[float]) -> None:
        """:meth:`add` of a whole case with its ROI (:func:`model_roi`)."""
        self.add(model, probabilities, gt, ignore, model_roi(probabilities, gt, self.labels, spacing, ignore))

    def _add_scope(self, scope: str, model: str, probabilities: np.ndarray, gt: np.ndarray, keep: np.ndarray) -> None:
        L = len(self.labels)
        st = self.stats[scope].setdefault(model, {"classwise": np.zeros((L, self.bins, 3)),
                                                  "top": np.zeros((self.bins, 3)), "nll": 0.0,
                                                  "brier": np.zeros(L), "n": 0})
        flat = keep.reshape(-1)
        g = gt.reshape(-1)[flat]
        probs = probabilities.reshape(L, -1)[:, flat]
        p_true = np.zeros(g.shape, np.float64)
        for i, label in enumerate(self.labels):
            p = probs[i].astype(np.float64)
            y = g == label
            st["classwise"][i] += _binned(p, y.astype(np.float64), self.bins)
            st["brier"][i] += float(np.sum((p - y) ** 2))
            p_true[y] = p[y]
        top = probs.argmax(axis=0)
        st["top"] += _binned(probs.max(axis=0).astype(np.float64),
                             (np.asarray(self.labels)[top] == g).astype(np.float64), self.bins)
        st["nll"] += float(-np.log(np.maximum(p_true, NLL_FLOOR)).sum())
        st["n"] += int(g.size)

    def merge(self, other: "CalibrationCounts") -> "CalibrationCounts":
        for scope, models in other.stats.items():
            for model, st in models.items():
                mine = self.stats[scope].get(model)
                if mine is None:
                    self.stats[scope][model] = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in st.items()}
                else:
                    for key in st:
                        mine[key] = mine[key] + st[key]
        return self

    def to_json(self) -> dict:
        return {"labels": self.labels, "bins": self.bins,
                "stats": {s: {m: {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in st.items()}
                              for m, st in models.items()} for s, models in self.stats.items()}}

    @classmethod
    def from_json(cls, d: dict) -> "CalibrationCounts":
        out = cls(d["labels"], d["bins"])
        for scope, models in d["stats"].items():
            out.stats[scope] = {m: {k: (np.asarray(v, dtype=np.float64) if isinstance(v, list) else v)
                                    for k, v in st.items()} for m, st in models.items()}
        return out

    # ---- metrics ------------------------------------------------------------------------------------------------
    @staticmethod
    def _ece(binned: np.ndarray) -> np.ndarray:
        total = binned[..., 0].sum(axis=-1)
        gap = np.abs(binned[..., 2] - binned[..., 1]).sum(axis=-1)  # Σ_b n_b |acc_b − conf_b|
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, gap / np.where(total > 0, total, 1), np.nan)

    def classwise_ece(self, model: str, scope: str = "all") -> np.ndarray:
        """``(L,)`` class-wise ECE per label."""
        return self._ece(self.stats[scope][model]["classwise"])

    def top_label_ece(self, model: str, scope: str = "all") -> float:
        return float(self._ece(self.stats[scope][model]["top"]))

    def nll(self, model: str, scope: str = "all") -> float:
        st = self.stats[scope][model]
        return st["nll"] / st["n"] if st["n"] else math.nan

    def brier(self, model: str, scope: str = "all") -> np.ndarray:
        """``(L,)`` one-vs-rest Brier score per label (their sum is the multi-class score)."""
        st = self.stats[scope][model]
        return st["brier"] / st["n"] if st["n"] else np.full(len(self.labels), np.nan)

    def reliability(self, model: str, label_index: Optional[int] = None, scope: str = "all"):
        """(mean confidence, observed frequency, voxel count) per non-empty bin: of one label (class-wise), or
        top-label when ``label_index`` is None."""
        st = self.stats[scope][model]
        d = st["top"] if label_index is None else st["classwise"][label_index]
        keep = d[:, 0] > 0
        return d[keep, 1] / d[keep, 0], d[keep, 2] / d[keep, 0], d[keep, 0]

    def rows(self, names: Optional[Dict[int, str]] = None) -> List[dict]:
        """calibration.csv rows: per scope, model and label (class-wise ECE, Brier), plus ``label = all`` (top-label
        ECE, NLL, multi-class Brier)."""
        names = names or {}
        rows = []
        for scope in SCOPES:
            for model, st in self.stats[scope].items():
                ece, brier = self.classwise_ece(model, scope), self.brier(model, scope)
                base = {"model": model, "scope": scope, "voxels": int(st["n"])}
                for i, label in enumerate(self.labels):
                    rows.append({**base, "label": str(label), "name": names.get(label, str(label)),
                                 "classwise_ece": float(ece[i]), "top_label_ece": math.nan, "nll": math.nan,
                                 "brier": float(brier[i])})
                rows.append({**base, "label": "all", "name": "all labels", "classwise_ece": math.nan,
                             "top_label_ece": self.top_label_ece(model, scope), "nll": self.nll(model, scope),
                             "brier": float(np.sum(brier))})
        return rows
