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

Region-based datasets (nnU-Net's ``regions_class_order``: one sigmoid output per region) get the same per
region ``r``: ``p̄_r = (1/K) Σ_k p_{k,r}``, the **binary entropy** ``H_2[p̄_r] = -p̄_r log2 p̄_r - (1-p̄_r) log2 (1-p̄_r)``
(at most 1 bit), ``MI_r = H_2[p̄_r] - (1/K) Σ_k H_2[p_{k,r}]``, and the disagreement per region: the share of
replicas whose label map, read as that region (label in the region's labels), differs from the consensus's.

Memory: the running sum (C float32 maps), the entropy sums (one float32 map, or one per region) and, in
:class:`~nnunet_varaug.evaluation.chunked.LabelMaps` on disk, the K label maps; every computation runs in row
chunks (:mod:`nnunet_varaug.evaluation.chunked`), and the mean is the sum divided in place.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from nnunet_varaug.evaluation import variability
from nnunet_varaug.evaluation.chunked import CHUNK_VALUES, LabelMaps, add_into, row_chunks

def _entropy_terms(q: np.ndarray) -> np.ndarray:
    """``q log2 q`` (0 where q <= 0), float32, one new array of q's shape."""
    t = np.zeros(q.shape, dtype=np.float32)
    np.log2(q, out=t, where=q > 0)
    t *= q
    return t


def entropy_bits(p: np.ndarray, axis: int = 0, out: Optional[np.ndarray] = None) -> np.ndarray:
    """``-Σ_c p_c log2 p_c`` over ``axis`` (the class axis), ``0 log 0 = 0``; float32, computed in chunks."""
    p = np.moveaxis(np.asarray(p), axis, 0) if axis else np.asarray(p)
    out = np.empty(p.shape[1:], dtype=np.float32) if out is None else out
    if p.ndim == 1:
        out[...] = np.abs(_entropy_terms(p.astype(np.float32)).sum(dtype=np.float32))
        return out
    for a, b in row_chunks(p.shape[1:], p.shape[0]):
        s = _entropy_terms(np.asarray(p[:, a:b], dtype=np.float32)).sum(axis=0, dtype=np.float32)
        np.abs(s, out=out[a:b])  # every term is <= 0: abs is the negation, without -0.0
    return out


def binary_entropy_bits(p: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
    """``-(p log2 p + (1-p) log2 (1-p))`` elementwise (a region's sigmoid probability), float32, in chunks."""
    p = np.asarray(p)
    out = np.empty(p.shape, dtype=np.float32) if out is None else out
    flat_p, flat_o = p.reshape(-1), out.reshape(-1)
    for a in range(0, flat_p.size, CHUNK_VALUES):
        q = np.asarray(flat_p[a:a + CHUNK_VALUES], dtype=np.float32)
        t = _entropy_terms(q)
        t += _entropy_terms(np.float32(1) - q)
        np.abs(t, out=flat_o[a:a + CHUNK_VALUES])
    return out


Maps = Union[np.ndarray, LabelMaps]


def map_chunks(maps: Maps, members: Optional[Sequence[int]] = None):
    """``(a, b, (len(members), b - a, ...))`` row chunks of K label maps (an array or a
    :class:`~nnunet_varaug.evaluation.chunked.LabelMaps`)."""
    if isinstance(maps, LabelMaps):
        yield from maps.chunks(members)
        return
    members = list(range(maps.shape[0])) if members is None else list(members)
    for a, b in row_chunks(maps.shape[1:], len(members)):
        yield a, b, maps[members, a:b]


class RunningEnsemble:
    """Accumulates K replicas' probability maps of one case, one at a time.

    Call :meth:`add` once per replica with its ``(C, *spatial)`` float32 probabilities (softmax, or sigmoid per
    region with ``regions=True``) and its label map, then :meth:`finish` (the mean, in place), :meth:`entropy`,
    :meth:`mutual_information`, :meth:`disagreement`. ``maps``: where the label maps go (default: a list in memory;
    predict passes a :class:`LabelMaps` file so that memory does not grow with K).
    """

    def __init__(self, regions: bool = False, maps: Optional[LabelMaps] = None) -> None:
        self.regions = regions
        self.sum: Optional[np.ndarray] = None
        self.entropy_sum: Optional[np.ndarray] = None
        self.maps = LabelMaps() if maps is None else maps
        self.count = 0
        self.finished = False

    def add(self, probabilities: np.ndarray, segmentation: np.ndarray, own: bool = False) -> None:
        """Add one replica. With ``own`` the first replica's float32 array becomes the sum (no copy; the caller
        gives it up); otherwise ``probabilities`` is only read."""
        p = probabilities
        if self.finished:
            raise ValueError("the ensemble is finished (its sum is now the mean)")
        if self.sum is not None and p.shape != self.sum.shape:
            raise ValueError(f"replica probabilities of shape {p.shape}, expected {self.sum.shape}")
        h = np.empty(p.shape if self.regions else p.shape[1:], dtype=np.float32)
        if self.regions:
            binary_entropy_bits(p, out=h)
        else:
            entropy_bits(p, out=h)
        if self.sum is None:  # as average_probabilities: float32, the first replica's values
            if own and p.dtype == np.float32 and p.flags.writeable:
                self.sum = p
            else:
                self.sum = np.empty(p.shape, dtype=np.float32)
                np.copyto(self.sum, p)
            self.entropy_sum = h
        else:
            add_into(self.sum, p)
            self.entropy_sum += h
        del h
        self.maps.append(segmentation)
        self.count += 1

    def finish(self) -> np.ndarray:
        """The mean probability, float32: the sum divided by K in place, as ``nnUNetv2_ensemble`` does."""
        if self.sum is None:
            raise ValueError("no replica added")
        if not self.finished:
            self.sum /= self.count
            self.finished = True
        return self.sum

    def mean(self) -> np.ndarray:
        """``(C, *spatial)`` mean probability, a new float32 array (sum divided by K, as ``nnUNetv2_ensemble``)."""
        if self.sum is None:
            raise ValueError("no replica added")
        if self.finished:
            return self.sum.copy()
        out = self.sum.copy()
        out /= self.count
        return out

    def entropy(self, mean: Optional[np.ndarray] = None, channel: Optional[int] = None) -> np.ndarray:
        """Predictive entropy of the mean probability, bits: over classes, or per region (all regions, or only
        region ``channel``) for region-based ensembles."""
        mean = self.finish() if mean is None else mean
        if not self.regions:
            return entropy_bits(mean)
        return binary_entropy_bits(mean if channel is None else mean[channel])

    def mutual_information(self, entropy: np.ndarray, channel: Optional[int] = None,
                           in_place: bool = False) -> np.ndarray:
        """``entropy - mean replica entropy``, bits, clipped at 0 (of region ``channel`` when given). ``in_place``
        writes it over the entropy sums (no new array; the sums are gone afterwards)."""
        sums = self.entropy_sum if channel is None else self.entropy_sum[channel]
        out = sums if in_place else np.empty(sums.shape, dtype=np.float32)
        k = np.float32(self.count)
        if entropy.shape != out.shape:
            raise ValueError(f"entropy of shape {entropy.shape}, the entropy sums {out.shape}")
        for a, b in row_chunks(out.shape):
            np.divide(sums[a:b], k, out=out[a:b])
            np.subtract(entropy[a:b], out[a:b], out=out[a:b])
            np.maximum(out[a:b], 0, out=out[a:b])
        return out

    def disagreement(self, consensus: np.ndarray, structure: Optional[variability.Structure] = None) -> np.ndarray:
        """Share of replicas whose label (or, with ``structure``, whose mask of it) differs from ``consensus``."""
        return disagreement(self.maps, consensus, structure)


def disagreement(maps: Maps, consensus: np.ndarray, structure: Optional[variability.Structure] = None) -> np.ndarray:
    """``(K, *spatial)`` label maps (or :class:`LabelMaps`), ``spatial`` consensus -> share of maps differing from it
    (as label maps, or as masks of ``structure``), float32, in row chunks."""
    out = np.zeros(consensus.shape, dtype=np.float32)
    count = 0
    for a, b, block in map_chunks(maps):
        count = block.shape[0]
        c = consensus[a:b]
        if structure is None:
            differ = block != c[None]
        else:
            differ = variability.structure_mask(block, structure.labels) != variability.structure_mask(
                c, structure.labels)[None]
        out[a:b] = differ.sum(axis=0, dtype=np.float32)
    out /= np.float32(count or (maps.count if isinstance(maps, LabelMaps) else maps.shape[0]))
    return out


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


def _summary(counts: np.ndarray, members: Sequence[int], consensus_voxels: List[int], uncertain: int,
             voxel_volume: float) -> CaseSummary:
    sub = counts[:, members][:, :, members]
    dice = variability.dice_matrix(sub)
    pairs = variability.pair_indices(len(members))
    mean_dice = [float(np.mean([dice[s, a, b] for a, b in pairs])) if pairs else 1.0 for s in range(len(sub))]
    return CaseSummary(voxel_volume, list(consensus_voxels), [[int(v) for v in np.diagonal(sub[s])]
                                                              for s in range(len(sub))], mean_dice, int(uncertain))


def summarize_case(maps: Maps, consensus: np.ndarray, spacing: Sequence[float],
                   structures: Sequence[variability.Structure],
                   groups: Optional[Sequence[Sequence[int]]] = None
                   ) -> Union[CaseSummary, Tuple[CaseSummary, List[CaseSummary]]]:
    """Volumes and pairwise Dice of K replica label maps (``(K, *spatial)`` or :class:`LabelMaps`) and their
    consensus, in one pass over row chunks. With ``groups`` (lists of map indices, e.g. one per fold) also each
    group's own summary (its pairwise Dice, its volumes, where any of its maps differs from the consensus):
    returns ``(summary, [group summaries])``."""
    count = maps.count if isinstance(maps, LabelMaps) else maps.shape[0]
    counts = np.zeros((len(structures), count, count), dtype=np.int64)
    uncertain = np.zeros(1 + len(groups or ()), dtype=np.int64)
    consensus_voxels = [0] * len(structures)
    for a, b, block in map_chunks(maps):
        counts += variability.overlap_counts(block, structures)
        c = consensus[a:b]
        differ = block != c[None]
        uncertain[0] += np.count_nonzero(differ.any(axis=0))
        for g, members in enumerate(groups or ()):
            uncertain[g + 1] += np.count_nonzero(differ[list(members)].any(axis=0))
        for i, st in enumerate(structures):
            consensus_voxels[i] += int(np.count_nonzero(variability.structure_mask(c, st.labels)))
    voxel_volume = float(np.prod(np.asarray(spacing, dtype=np.float64)))
    summary = _summary(counts, list(range(count)), consensus_voxels, uncertain[0], voxel_volume)
    if groups is None:
        return summary
    return summary, [_summary(counts, list(m), consensus_voxels, uncertain[g + 1], voxel_volume)
                     for g, m in enumerate(groups)]


def fold_rows(case: str, folds: Sequence, summaries: Sequence[CaseSummary],
              structures: Sequence[variability.Structure]) -> List[Dict]:
    """folds.csv rows of one case: per fold and structure, the agreement of that fold's replicas (mean pairwise
    Dice, volumes) and the volume where any of them differs from the consensus of all folds."""
    rows = []
    for fold, s in zip(folds, summaries):
        for i, st in enumerate(structures):
            v = np.asarray(s.replica_voxels[i], dtype=np.float64) * s.voxel_volume
            rows.append({"case": case, "fold": str(fold), "label": st.key, "name": st.name,
                         "mean_pairwise_dice": s.mean_pairwise_dice[i], "replica_mean_mm3": float(v.mean()),
                         "replica_std_mm3": float(v.std(ddof=1)) if v.size > 1 else 0.0,
                         "uncertain_volume_mm3": s.uncertain_volume_mm3})
    return rows


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
