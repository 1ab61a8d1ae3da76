"""Replica-ensemble uncertainty in plain numpy: running sums, consensus, entropy, mutual information, review score.

Definitions (also in docs/inference.md). ``p_k`` is replica ``k``'s class-probability map (nnU-Net's softmax,
resampled to the input grid exactly as ``nnUNetv2_predict --save_probabilities`` writes it), ``K`` replicas:

* **Mean probability** ``p̄ = (1/K) Σ_k p_k``, summed in float32 in replica order and divided once — the same
  operations, in the same order, as ``nnUNetv2_ensemble`` (``average_probabilities``), so its argmax (the
  **consensus**) is the ensemble's segmentation voxel for voxel.
* **Predictive entropy** ``H[p̄] = -Σ_c p̄_c log2 p̄_c`` in **bits** (0 log 0 = 0); at most log2(C) for C classes.
* **Mutual information** ``MI = H[p̄] - (1/K) Σ_k H[p_k]`` in bits (Jensen: MI ≥ 0; float rounding below 0 is
  clipped to 0). It is the part of the predictive entropy due to the replicas disagreeing (epistemic
  uncertainty as far as replicas sample it); the mean entropy is what every replica is unsure about itself.
* **Disagreement**: the share of replicas whose own label (argmax of ``p_k``) differs from the consensus.
* **Review score** of a case: ``1 - min_s mean_pairs Dice_s`` — one minus the mean pairwise Dice between the
  replicas' label maps of the structure that agrees least (two empty masks: Dice 1, see
  :mod:`nnunet_varaug.evaluation.variability`). Ties are broken by the uncertain volume (voxels where any replica
  disagrees with the consensus, in mm³).

Only one replica's probabilities, the running sums (C float32 maps + one float32 entropy sum) and K uint8 label
maps are held at a time: never K probability maps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from nnunet_varaug.evaluation import variability


def entropy_bits(p: np.ndarray, axis: int = 0) -> np.ndarray:
    """``-Σ p log2 p`` along ``axis`` (the class axis), with ``0 log 0 = 0``; float32."""
    p = np.asarray(p, dtype=np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log2(np.where(p > 0, p, 1.0)), 0.0)
    return np.abs(-terms.sum(axis=axis, dtype=np.float32)).astype(np.float32)


class RunningEnsemble:
    """Accumulates K replicas' probability maps of one case, one at a time.

    Call :meth:`add` once per replica with its ``(C, *spatial)`` float32 probabilities and its label map, then
    :meth:`mean`, :meth:`entropy`, :meth:`mutual_information`, :meth:`disagreement`.
    """

    def __init__(self) -> None:
        self.sum: Optional[np.ndarray] = None
        self.entropy_sum: Optional[np.ndarray] = None
        self.maps: List[np.ndarray] = []

    @property
    def count(self) -> int:
        return len(self.maps)

    def add(self, probabilities: np.ndarray, segmentation: np.ndarray) -> None:
        """Add one replica. ``probabilities`` is not kept (it is copied into the sum on the first call)."""
        if self.sum is None:
            self.sum = np.array(probabilities, dtype=np.float32, copy=True)  # as average_probabilities: float32
            self.entropy_sum = np.zeros(self.sum.shape[1:], dtype=np.float32)
        else:
            if probabilities.shape != self.sum.shape:
                raise ValueError(f"replica probabilities of shape {probabilities.shape}, expected {self.sum.shape}")
            self.sum += probabilities
        self.entropy_sum += entropy_bits(probabilities)
        self.maps.append(np.asarray(segmentation).astype(np.uint8 if segmentation.max(initial=0) < 256 else np.uint16))

    def mean(self) -> np.ndarray:
        """``(C, *spatial)`` mean probability, float32 (sum divided by K, as ``nnUNetv2_ensemble``)."""
        if self.sum is None:
            raise ValueError("no replica added")
        out = self.sum.copy()
        out /= self.count
        return out

    def entropy(self, mean: Optional[np.ndarray] = None) -> np.ndarray:
        """Predictive entropy of the mean probability, bits."""
        return entropy_bits(self.mean() if mean is None else mean)

    def mutual_information(self, entropy: np.ndarray) -> np.ndarray:
        """``entropy - mean replica entropy``, bits, clipped at 0."""
        return np.maximum(entropy - self.entropy_sum / np.float32(self.count), 0).astype(np.float32)

    def disagreement(self, consensus: np.ndarray) -> np.ndarray:
        """Share of replicas whose label differs from ``consensus``, float32 in [0, 1]."""
        return disagreement(np.stack(self.maps), consensus)


def disagreement(maps: np.ndarray, consensus: np.ndarray) -> np.ndarray:
    """``(K, *spatial)`` label maps, ``spatial`` consensus -> share of maps differing from it, float32."""
    out = np.zeros(consensus.shape, dtype=np.float32)
    for m in maps:
        out += m != consensus
    return out / np.float32(len(maps))


@dataclass
class CaseSummary:
    """Per-case volumes and agreement of K replicas and their consensus (plain numbers, JSON-friendly)."""

    voxel_volume: float                 # mm³
    consensus_voxels: List[int]         # per structure
    replica_voxels: List[List[int]]     # [structure][replica]
    mean_pairwise_dice: List[float]     # per structure
    uncertain_voxels: int               # voxels where some replica differs from the consensus

    def to_json(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, d: dict) -> "CaseSummary":
        return cls(**d)

    @property
    def review_score(self) -> float:
        """``1 - min over structures of the mean pairwise Dice`` (0 when the replicas agree everywhere)."""
        return float(1.0 - min(self.mean_pairwise_dice)) if self.mean_pairwise_dice else 0.0

    @property
    def uncertain_volume_mm3(self) -> float:
        return self.uncertain_voxels * self.voxel_volume


def summarize_case(maps: np.ndarray, consensus: np.ndarray, spacing: Sequence[float],
                   structures: Sequence[variability.Structure]) -> CaseSummary:
    """Volumes and pairwise Dice of ``(K, *spatial)`` replica label maps and their consensus, one chunked pass."""
    counts = variability.overlap_counts(maps, structures)  # (S, K, K)
    k = maps.shape[0]
    dice = variability.dice_matrix(counts)
    pairs = variability.pair_indices(k)
    mean_dice = [float(np.mean([dice[s, a, b] for a, b in pairs])) if pairs else 1.0 for s in range(len(structures))]
    consensus_voxels = [int(np.count_nonzero(variability.structure_mask(consensus, st.labels))) for st in structures]
    uncertain = int(np.count_nonzero(np.any(maps != consensus[None], axis=0)))
    return CaseSummary(float(np.prod(np.asarray(spacing, dtype=np.float64))), consensus_voxels,
                       [[int(v) for v in np.diagonal(counts[s])] for s in range(len(structures))], mean_dice,
                       uncertain)


def volume_rows(case: str, summary: CaseSummary, structures: Sequence[variability.Structure]) -> List[Dict]:
    """Rows of volumes.csv for one case: consensus volume and the replicas' min/max/mean/std (mm³)."""
    rows = []
    for s, st in enumerate(structures):
        v = np.asarray(summary.replica_voxels[s], dtype=np.float64) * summary.voxel_volume
        rows.append({"case": case, "label": st.key, "name": st.name,
                     "consensus_mm3": summary.consensus_voxels[s] * summary.voxel_volume,
                     "replica_min_mm3": float(v.min()), "replica_max_mm3": float(v.max()),
                     "replica_mean_mm3": float(v.mean()),
                     "replica_std_mm3": float(v.std(ddof=1)) if v.size > 1 else 0.0})
    return rows


def review_rows(summaries: Dict[str, CaseSummary], structures: Sequence[variability.Structure],
                flag_above: Optional[float] = None) -> List[Dict]:
    """review.csv rows, most doubtful first (score, then uncertain volume, descending; then case name)."""
    rows = []
    for case, s in summaries.items():
        worst = int(np.argmin(s.mean_pairwise_dice)) if s.mean_pairwise_dice else None
        rows.append({"case": case, "score": s.review_score,
                     "least_agreeing_structure": structures[worst].name if worst is not None else "",
                     "min_mean_pairwise_dice": min(s.mean_pairwise_dice) if s.mean_pairwise_dice else 1.0,
                     "uncertain_volume_mm3": s.uncertain_volume_mm3,
                     "flagged": bool(flag_above is not None and s.review_score > flag_above)})
    rows.sort(key=lambda r: (-r["score"], -r["uncertain_volume_mm3"], r["case"]))
    for rank, r in enumerate(rows, 1):
        r["rank"] = rank
    return rows
