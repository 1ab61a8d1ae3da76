"""Voxel-wise vote of K replicas' label maps: majority (with its tie rule), entropy in bits, disagreement.

Conventions (docs/variability.md): the majority vote is the most frequent label; a tie goes to the tied label
with the highest mean predicted probability over the replicas when probabilities are given (``analyze`` sums
each replica's softmax per case), else — and when those probabilities are equal too — to the smallest label
value. With two labels a tie needs an even K; with three or more labels any K can tie (e.g. 1-1-1 with K = 3).
Entropy is ``-sum_l p_l log2 p_l`` in bits (``p_l`` the fraction of replicas voting ``l``); the normalised
entropy divides it by ``log2 K``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np


def vote_flat(maps: np.ndarray, labels: Sequence[int], prob: Optional[np.ndarray] = None
          ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, bool, int, int]:
    """Majority, entropy, disagreement of ``(K, n)`` maps, whether every value was one of ``labels``, the number of
    tied voxels and how many of them the probabilities decided.

    ``prob``: ``(C, n)`` mean predicted probability per label value (row = label value) or None. A tie goes to
    the tied label with the highest mean probability; without ``prob``, or when those are equal, to the smallest.
    """
    k = maps.shape[0]
    counts = np.stack([np.count_nonzero(maps == v, axis=0) for v in labels]).astype(np.int32)  # (L, n)
    best = counts.max(axis=0)
    tied = counts == best
    n_tied = tied.sum(axis=0) > 1
    pick = np.argmax(tied, axis=0)  # the first (smallest) tied label
    by_prob = 0
    if prob is not None and n_tied.any():
        cols = np.flatnonzero(n_tied)
        score = np.where(tied[:, cols], prob[np.asarray(labels)][:, cols], -np.inf)
        chosen = np.argmax(score, axis=0)  # equal probabilities: the first, i.e. the smallest label
        by_prob = int(np.count_nonzero(np.sort(score, axis=0)[-2] < score.max(axis=0)))  # a strict winner
        pick[cols] = chosen
    best_label = np.asarray(labels, dtype=maps.dtype)[pick]
    p = counts / k
    entropy = np.abs(-(p * np.log2(np.where(counts > 0, p, 1.0))).sum(axis=0))  # abs: -0.0 -> 0.0
    known = bool((counts.sum(axis=0) == k).all())
    return (best_label, entropy.astype(np.float32), (1.0 - best / k).astype(np.float32), known,
            int(n_tied.sum()), by_prob)


def voxel_maps(maps: np.ndarray, labels: Sequence[int], probabilities: Optional[np.ndarray] = None
               ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Majority vote, entropy (bits) and disagreement fraction of ``(K, *spatial)`` label maps.

    ``labels`` must list every value present (else ValueError). ``probabilities``: optional ``(C, *spatial)``
    mean predicted probability of each label value (row = label value) over the replicas, which breaks ties of
    the vote; without it (or when equal) ties go to the smallest label.
    """
    labels = sorted(int(v) for v in labels)
    k = maps.shape[0]
    prob = None if probabilities is None else probabilities.reshape(probabilities.shape[0], -1)
    majority, entropy, disagreement, known, _, _ = vote_flat(maps.reshape(k, -1), labels, prob)
    if not known:
        check_labels(maps, labels, "the label maps")
    shape = maps.shape[1:]
    return majority.reshape(shape), entropy.reshape(shape), disagreement.reshape(shape)


def normalised_entropy(entropy: np.ndarray, k: int) -> np.ndarray:
    """Entropy in bits divided by ``log2 K``: 0 = unanimous, 1 = all K replicas differ; comparable across K."""
    return (np.asarray(entropy, dtype=np.float32) / np.float32(math.log2(k))).astype(np.float32)


def check_labels(array: np.ndarray, labels: Sequence[int], what: str) -> None:
    """Raise ValueError naming ``what`` if ``array`` holds a value outside ``labels``."""
    present = np.unique(array)
    bad = np.setdiff1d(present, np.asarray(list(labels)))
    if bad.size:
        shown = [int(b) if float(b).is_integer() else float(b) for b in bad.tolist()]
        raise ValueError(f"{what} holds label values {shown} that dataset.json does not define "
                         f"(it defines {sorted(int(v) for v in labels)})")




def vote_block(block: np.ndarray, labels: Sequence[int], known: np.ndarray, prob: Optional[np.ndarray] = None):
    """The vote of one chunk ``(K, n)`` of the replicas' maps, computed only where they differ (elsewhere it is their
    common label); a value outside ``labels`` (``known``: a boolean table indexed by value) raises ValueError.

    Returns ``(agree, majority, differ, entropy, disagreement, ties, ties_by_probability)``: ``agree`` the voxels
    where all replicas agree, ``entropy`` and ``disagreement`` for the ``differ`` voxels only (None when none).
    ``prob``: the chunk's ``(C, n)`` mean probabilities, or None."""
    agree = np.logical_and.reduce(block[1:] == block[0], axis=0)
    maj = block[0].copy()
    differ = np.flatnonzero(~agree)
    e = d = None
    ties = by_prob = 0
    if differ.size:
        p = None if prob is None else np.take(prob, differ, axis=1)
        m, e, d, ok, ties, by_prob = vote_flat(np.take(block, differ, axis=1), labels, p)
        if not ok:
            check_labels(block, labels, "the label maps")
        maj[differ] = m
    if block[0].size and (int(block[0].min()) < 0 or int(block[0].max()) >= known.size or not known[block[0]].all()):
        check_labels(block[0], labels, "the label maps")
    return agree, maj, differ, e, d, ties, by_prob
