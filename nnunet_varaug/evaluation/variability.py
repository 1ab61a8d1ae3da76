"""How much do K replicas disagree? Metrics on K label maps of one case, in plain numpy.

Everything per case comes out of **one pass** over the K label maps (:func:`analyze_case`): the maps are read
in chunks of voxels and, per chunk, each structure's K masks (plus the majority vote's) are encoded as one
integer per voxel (bit ``k`` set when replica ``k`` has the structure there) and counted with one ``bincount``.
From those counts follow, for all ``K(K-1)/2`` pairs at once, the intersections ``|A_a ∩ A_b|`` and the
volumes ``|A_a|`` (the diagonal), hence every pairwise Dice and every volume; comparing each replica with the
ground truth costs one more bincount per structure. Nothing of size ``K x K x voxels`` is ever built, and the
extra memory is a few chunk-sized arrays, independent of the volume's size.

Conventions (also in docs/variability.md):

* **Structures** are nnU-Net's: the foreground labels of dataset.json, or its regions for region-based
  datasets (a voxel is in a region when its label is one of the region's labels). The ignore label is none.
* **Absent in both, between replicas**: the pairwise Dice of two masks that are both empty is
  ``EMPTY_DICE = 1.0`` — both replicas agree the structure is not there. Tables flag such pairs
  (``both_empty``) so that means can be taken with and without them.
* **Absent in both, to the ground truth**: nnU-Net's convention (``compute_metrics`` in
  ``nnunetv2.evaluation.evaluate_predictions``): Dice is NaN when prediction and ground truth are both empty
  (on the non-ignored voxels), and such cases are left out of means (``GT_EMPTY_DICE``).
* **Majority vote**: the most frequent label over the K replicas. A tie (possible for any K with 3+ labels, and
  for even K with 2) goes to the tied label with the highest mean predicted probability over the replicas when
  probabilities are given, else (and when those are equal too) to the smallest label value.
* **Entropy**: ``-sum_l p_l log2 p_l`` in bits, ``p_l`` the fraction of replicas voting label ``l``; the
  normalised entropy divides it by ``log2 K`` (1 = the K replicas all differ, reachable only with K labels).
* **Disagreement**: the fraction of replicas whose label differs from the majority vote.
* **Ground truth**: voxels with nnU-Net's ignore label in the ground truth are left out of Dice to the ground
  truth (as nnU-Net's own evaluation does); they still count in pairwise Dice and volumes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from nnunet_varaug.evaluation.voting import vote_block

EMPTY_DICE = 1.0
"""Dice of two replicas' empty masks (the structure is absent from both): perfect agreement."""

GT_EMPTY_DICE = math.nan
"""Dice to the ground truth when both are empty: NaN, left out of means, as nnU-Net's ``summary.json`` does."""

DEFAULT_CHUNK = 1 << 18
"""Voxels per chunk: big enough for numpy to be efficient, small enough to stay in cache-sized buffers."""

_MAX_BITS = 16
"""Up to this many maps per comparison, counts use a 2^M-bin bincount; beyond it, a K x K matrix product."""


@dataclass(frozen=True)
class Structure:
    """One structure to measure: a name and the label values that make it up (several for a region)."""

    name: str
    labels: Tuple[int, ...]

    @property
    def key(self) -> str:
        """How tables name it: the label value, or region labels joined by '+' (e.g. ``1+2``)."""
        return "+".join(str(v) for v in self.labels)


def structures_from_dataset_json(dataset_json: dict) -> List[Structure]:
    """The structures nnU-Net evaluates for this dataset: foreground labels, or regions if it has regions."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    labels = dataset_json["labels"]
    manager = LabelManager(labels, dataset_json.get("regions_class_order"))

    def name_of(value) -> str:
        for name, v in labels.items():
            if (tuple(v) if isinstance(v, (list, tuple)) else (v,)) == tuple(np.atleast_1d(value).tolist()):
                return name
        return "+".join(str(x) for x in np.atleast_1d(value).tolist())

    if manager.has_regions:
        return [Structure(name_of(r), tuple(int(x) for x in np.atleast_1d(r))) for r in manager.foreground_regions]
    return [Structure(name_of(v), (int(v),)) for v in manager.foreground_labels]


def label_values(dataset_json: dict) -> List[int]:
    """Every label value a prediction may hold (background and all labels and region members, not ignore)."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    manager = LabelManager(dataset_json["labels"], dataset_json.get("regions_class_order"))
    return sorted(int(v) for v in manager.all_labels)


def has_regions(dataset_json: dict) -> bool:
    """Whether the dataset is region-based (sigmoid outputs per region, no distribution over labels)."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    return LabelManager(dataset_json["labels"], dataset_json.get("regions_class_order")).has_regions


def ignore_label(dataset_json: dict) -> Optional[int]:
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    return LabelManager(dataset_json["labels"], dataset_json.get("regions_class_order")).ignore_label


# ---- counting -------------------------------------------------------------------------------------------------
def structure_mask(chunk: np.ndarray, labels: Tuple[int, ...]) -> np.ndarray:
    """Boolean mask of ``chunk`` (any shape) being one of ``labels``."""
    out = chunk == labels[0]
    for v in labels[1:]:
        out |= chunk == v
    return out


def _bit_matrix(m: int) -> np.ndarray:
    return ((np.arange(1 << m)[:, None] >> np.arange(m)[None, :]) & 1).astype(np.int64)


def _gram(masks: np.ndarray, bits: Optional[np.ndarray]) -> np.ndarray:
    """``G[a, b] = |masks[a] & masks[b]|`` for a boolean ``(M, n)`` array, as int64."""
    m = masks.shape[0]
    if bits is not None:  # one combined index per voxel (bit k = map k), one bincount
        weights = (1 << np.arange(m)).astype(np.float32)  # sums < 2^16: exact in float32
        code = (weights @ masks.astype(np.float32)).astype(np.int32)
        counts = np.bincount(code, minlength=1 << m).astype(np.int64)
        return (bits * counts[:, None]).T @ bits
    x = masks.astype(np.float32)  # exact: a chunk holds far fewer than 2^24 voxels
    return np.rint(x @ x.T).astype(np.int64)


FreeRow = Tuple[np.ndarray, Optional[Tuple[int, ...]]]
"""An extra row of a count: a label array and the labels that make its mask (None: the structure's labels)."""


def _count_chunk(out: np.ndarray, block: np.ndarray, structures: Sequence[Structure], bits: Optional[np.ndarray],
                 agree: Optional[np.ndarray] = None, free: Sequence[FreeRow] = ()) -> None:
    """``out[s] +=`` the Gram matrix of structure ``s``'s masks of ``block``'s rows, then of the ``free`` rows.

    Why split by agreement: where all rows of ``block`` hold the same label (most voxels of real predictions)
    their masks are equal, so their counts are one count repeated; only the remaining voxels need the
    combined-index bincount. ``agree`` may be passed when the caller knows it already.
    """
    r = block.shape[0]
    if agree is None:
        agree = np.logical_and.reduce(block[1:] == block[0], axis=0) if r > 1 else np.ones(block.shape[1], bool)
    differ = np.flatnonzero(~agree)  # np.take on indices: several times faster than boolean indexing
    sub = np.take(block, differ, axis=1) if differ.size else None
    free_sub = [(np.take(row, differ), labels) for row, labels in free] if differ.size else []
    index = [0] * r + list(range(1, len(free) + 1))
    for s, st in enumerate(structures):
        same = [structure_mask(block[0], st.labels) & agree] + [structure_mask(row, labels or st.labels) & agree
                                                       for row, labels in free]
        small = np.array([[np.count_nonzero(a & b) if i != j else np.count_nonzero(a)
                           for j, b in enumerate(same)] for i, a in enumerate(same)], dtype=np.int64)
        out[s] += small[np.ix_(index, index)]
        if sub is not None:
            masks = np.concatenate([structure_mask(sub, st.labels)]
                                   + [structure_mask(row, labels or st.labels)[None] for row, labels in free_sub])
            out[s] += _gram(masks, bits)


def overlap_counts(maps: np.ndarray, structures: Sequence[Structure], chunk: int = DEFAULT_CHUNK) -> np.ndarray:
    """Intersections of every pair of maps, per structure, in one chunked pass.

    Args:
        maps: ``(M, *spatial)`` integer label maps.
        structures: what to count.
        chunk: voxels per chunk.

    Returns:
        ``(S, M, M)`` int64: ``[s, a, b]`` voxels where maps ``a`` and ``b`` both hold structure ``s``; the
        diagonal ``[s, a, a]`` is map ``a``'s voxel count of ``s``.
    """
    flat = maps.reshape(maps.shape[0], -1)
    m = flat.shape[0]
    bits = _bit_matrix(m) if m <= _MAX_BITS else None
    out = np.zeros((len(structures), m, m), dtype=np.int64)
    for start in range(0, flat.shape[1], chunk):
        _count_chunk(out, np.ascontiguousarray(flat[:, start:start + chunk]), structures, bits)
    return out


def dice_matrix(counts: np.ndarray, empty: float = EMPTY_DICE) -> np.ndarray:
    """``(..., M, M)`` overlap counts -> Dice ``2|A∩B| / (|A|+|B|)``; ``empty`` where both are empty."""
    diag = np.diagonal(counts, axis1=-2, axis2=-1).astype(np.float64)
    denom = diag[..., :, None] + diag[..., None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = 2.0 * counts / denom
    return np.where(denom == 0, empty, dice)


def pairwise_dice(maps: np.ndarray, structures: Sequence[Structure], chunk: int = DEFAULT_CHUNK) -> np.ndarray:
    """``(S, K, K)`` Dice between every pair of the K maps (one pass); the diagonal is 1."""
    return dice_matrix(overlap_counts(maps, structures, chunk))


def pair_indices(k: int) -> List[Tuple[int, int]]:
    """The K(K-1)/2 unordered pairs ``(a, b)``, ``a < b``, in the order tables list them."""
    return [(a, b) for a in range(k) for b in range(a + 1, k)]


# ---- one case -------------------------------------------------------------------------------------------------
@dataclass
class CaseResult:
    """Everything measured on one case. Rows 0..K-1 of ``overlap`` are the replicas, row K the majority vote."""

    structures: List[Structure]
    num_replicas: int
    voxel_volume: float
    overlap: np.ndarray                       # (S, K+1, K+1) int64
    majority: np.ndarray                      # spatial, the label maps' dtype
    entropy: np.ndarray                       # spatial, float32, bits
    disagreement: np.ndarray                  # spatial, float32 in [0, 1)
    gt_intersection: Optional[np.ndarray] = None  # (S, K+1): |pred ∩ gt| on non-ignored voxels
    gt_pred_volume: Optional[np.ndarray] = None   # (S, K+1): |pred| on non-ignored voxels
    gt_volume: Optional[np.ndarray] = None        # (S,): |gt|
    ref_intersection: Optional[np.ndarray] = None  # (S, K+1): |pred ∩ reference model's prediction|
    ref_volume: Optional[np.ndarray] = None        # (S,): |reference model's prediction| (e.g. the IEEE model)
    ref_gt_intersection: Optional[np.ndarray] = None  # (S,): |reference ∩ gt| on non-ignored voxels
    ref_gt_pred_volume: Optional[np.ndarray] = None   # (S,): |reference| on non-ignored voxels
    tie_voxels: int = 0                            # voxels whose vote was a tie
    ties_by_probability: int = 0                   # of those, resolved by the mean probability

    @property
    def voxels(self) -> np.ndarray:
        """``(S, K)`` voxel count of each structure in each replica."""
        return np.diagonal(self.overlap, axis1=1, axis2=2)[:, : self.num_replicas].copy()

    @property
    def volumes_mm3(self) -> np.ndarray:
        """``(S, K)`` volumes in mm^3 (voxel count times the product of the spacing)."""
        return self.voxels * self.voxel_volume

    @property
    def pairwise_dice(self) -> np.ndarray:
        """``(S, P)`` Dice of each replica pair, pairs in :func:`pair_indices` order."""
        d = dice_matrix(self.overlap)
        return np.stack([d[:, a, b] for a, b in pair_indices(self.num_replicas)], axis=1)

    @property
    def pairwise_both_empty(self) -> np.ndarray:
        """``(S, P)`` True where both replicas of the pair lack the structure (their Dice is ``EMPTY_DICE``)."""
        v = self.voxels
        return np.stack([(v[:, a] == 0) & (v[:, b] == 0) for a, b in pair_indices(self.num_replicas)], axis=1)

    @property
    def has_gt(self) -> bool:
        return self.gt_intersection is not None

    def _dice_gt(self) -> np.ndarray:
        denom = self.gt_pred_volume + self.gt_volume[:, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            d = 2.0 * self.gt_intersection / denom
        return np.where(denom == 0, GT_EMPTY_DICE, d)

    @property
    def has_reference(self) -> bool:
        return self.ref_intersection is not None

    @property
    def dice_to_reference(self) -> Optional[np.ndarray]:
        """``(S, K+1)`` Dice of each replica (and, last, the majority vote) to the reference model's prediction,
        pairwise convention (``EMPTY_DICE`` when both are empty); None without a reference."""
        if not self.has_reference:
            return None
        pred = np.diagonal(self.overlap, axis1=1, axis2=2)
        denom = pred + self.ref_volume[:, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            d = 2.0 * self.ref_intersection / denom
        return np.where(denom == 0, EMPTY_DICE, d)

    @property
    def reference_dice_to_gt(self) -> Optional[np.ndarray]:
        """``(S,)`` the reference model's Dice to the ground truth (nnU-Net's convention), or None."""
        if not (self.has_reference and self.has_gt):
            return None
        denom = self.ref_gt_pred_volume + self.gt_volume
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denom == 0, GT_EMPTY_DICE, 2.0 * self.ref_gt_intersection / denom)

    @property
    def reference_volume_mm3(self) -> Optional[np.ndarray]:
        """``(S,)`` the reference model's volumes in mm^3, or None."""
        return None if not self.has_reference else self.ref_volume * self.voxel_volume

    @property
    def dice_to_gt(self) -> Optional[np.ndarray]:
        """``(S, K)`` each replica's Dice to the ground truth (NaN when both are empty), or None without it."""
        return None if not self.has_gt else self._dice_gt()[:, : self.num_replicas]

    @property
    def majority_dice_to_gt(self) -> Optional[np.ndarray]:
        """``(S,)`` the majority vote's Dice to the ground truth, or None without ground truth."""
        return None if not self.has_gt else self._dice_gt()[:, self.num_replicas]


def analyze_case(maps: np.ndarray, spacing: Sequence[float], structures: Sequence[Structure],
                 labels: Sequence[int], gt: Optional[np.ndarray] = None, ignore: Optional[int] = None,
                 chunk: int = DEFAULT_CHUNK, probabilities: Optional[np.ndarray] = None,
                 reference: Optional[np.ndarray] = None) -> CaseResult:
    """All per-case metrics of K replicas' label maps in one chunked pass.

    Args:
        maps: ``(K, *spatial)`` integer label maps of the K replicas, K >= 2, all on one grid.
        spacing: voxel spacing in mm (any order; only its product is used).
        structures: what to measure (:func:`structures_from_dataset_json`).
        labels: every label value the maps may hold (:func:`label_values`); any other value is an error.
        gt: optional ground truth ``spatial`` label map on the same grid.
        ignore: the ground truth's ignore label, if the dataset has one.
        chunk: voxels per chunk.
        probabilities: optional ``(C, *spatial)`` mean predicted probability of each label value over the K
            replicas (row = label value); it breaks ties of the majority vote.
        reference: optional label map of a reference model (e.g. the IEEE model) on the same grid; each
            replica's Dice to it is measured (``CaseResult.dice_to_reference``).

    Raises:
        ValueError: K < 2, shapes differ, or a map holds a value outside ``labels``.
    """
    k = maps.shape[0]
    check_case_inputs(maps, gt, reference, probabilities)
    labels = sorted(int(v) for v in labels)
    # rows of the counts: K replicas, the majority vote, then (with ground truth) its structure mask and its ignore
    # mask, then (with a reference model) its map
    free: List[FreeRow] = []
    if gt is not None:
        gflat = gt.reshape(-1)
        free = [(gflat, None)] + ([] if ignore is None else [(gflat, (int(ignore),))])
    if reference is not None:
        free.append((reference.reshape(-1), None))
    prob = None if probabilities is None else probabilities.reshape(probabilities.shape[0], -1)
    counts, majority, entropy, disagreement, ties, by_prob = _vote_and_count(maps.reshape(k, -1), labels, prob, free,
                                                                             structures, chunk)
    spatial = maps.shape[1:]
    result = CaseResult(list(structures), k, float(np.prod(np.asarray(spacing, dtype=np.float64))),
                        counts[:, : k + 1, : k + 1].copy(), majority.reshape(spatial), entropy.reshape(spatial),
                        disagreement.reshape(spatial), tie_voxels=ties, ties_by_probability=by_prob)
    return attach_reference_counts(result, counts, gt is not None, ignore, reference is not None)


def _vote_and_count(flat: np.ndarray, labels: List[int], prob: Optional[np.ndarray], free: Sequence[FreeRow],
                    structures: Sequence[Structure], chunk: int):
    """The one chunked pass of :func:`analyze_case` over ``(K, n)`` maps: each chunk's vote, then the overlap counts
    of the replicas, the vote and the ``free`` rows (flat maps cut per chunk). Returns (counts, majority, entropy,
    disagreement, tie voxels, ties decided by probability)."""
    known = np.zeros(max(labels) + 1, dtype=bool)
    known[labels] = True
    k, n = flat.shape
    majority = np.empty(n, dtype=flat.dtype)
    entropy = np.zeros(n, dtype=np.float32)
    disagreement = np.zeros(n, dtype=np.float32)
    rows = k + 1 + len(free)
    ties = by_prob = 0
    bits = _bit_matrix(rows) if rows <= _MAX_BITS else None
    counts = np.zeros((len(structures), rows, rows), dtype=np.int64)
    for start in range(0, n, chunk):
        block = np.ascontiguousarray(flat[:, start:start + chunk])
        agree, maj, differ, e, d, t, b = vote_block(block, labels, known,
                                                    None if prob is None else prob[:, start:start + chunk])
        ties, by_prob = ties + t, by_prob + b
        if differ.size:
            entropy[start + differ] = e
            disagreement[start + differ] = d
        majority[start:start + chunk] = maj
        rows_free = [(a[start:start + chunk], values) for a, values in free]
        _count_chunk(counts, np.concatenate([block, maj[None]]), structures, bits, agree, rows_free)
    return counts, majority, entropy, disagreement, ties, by_prob


def check_case_inputs(maps: np.ndarray, gt: Optional[np.ndarray], reference: Optional[np.ndarray],
                      probabilities: Optional[np.ndarray]) -> None:
    """K >= 2 maps; ground truth, reference map and probabilities on the maps' grid (else ValueError)."""
    if maps.shape[0] < 2:
        raise ValueError(f"variability needs at least 2 replicas, got {maps.shape[0]}")
    if gt is not None and gt.shape != maps.shape[1:]:
        raise ValueError(f"ground truth has shape {gt.shape}, the replicas' maps {maps.shape[1:]}")
    for what, arr in (("reference map", reference), ("probabilities", probabilities)):
        if arr is not None and tuple(arr.shape[-len(maps.shape[1:]):]) != tuple(maps.shape[1:]):
            raise ValueError(f"{what} has shape {arr.shape}, the replicas' maps {maps.shape[1:]}")


def attach_reference_counts(result: CaseResult, counts: np.ndarray, has_gt: bool, ignore: Optional[int],
                            has_reference: bool) -> CaseResult:
    """Read the ground truth's and the reference model's overlaps out of the count matrix, whose rows are the K
    replicas, the majority vote, then (with ground truth) its mask and ignore mask, then the reference map."""
    k = result.num_replicas
    n_gt = 0 if not has_gt else 1 if ignore is None else 2
    if has_reference:
        r = k + 1 + n_gt
        result.ref_intersection = counts[:, : k + 1, r].copy()
        result.ref_volume = counts[:, r, r].copy()
        if has_gt:
            result.ref_gt_intersection = counts[:, r, k + 1].copy()
            result.ref_gt_pred_volume = result.ref_volume - (0 if ignore is None else counts[:, r, k + 2])
    if has_gt:
        result.gt_intersection = counts[:, : k + 1, k + 1].copy()
        pred = np.diagonal(counts, axis1=1, axis2=2)[:, : k + 1]
        result.gt_pred_volume = pred - (0 if ignore is None else counts[:, : k + 1, k + 2])
        result.gt_volume = counts[:, k + 1, k + 1].copy()
    return result


# ---- over cases -----------------------------------------------------------------------------------------------


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation of two sequences, NaN when undefined (fewer than 2 points, or no spread)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 2 or np.std(x) == 0 or np.std(y) == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])
