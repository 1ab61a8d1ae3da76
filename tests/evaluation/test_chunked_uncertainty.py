"""Chunked, bounded-memory ensemble uncertainty (nnunet_varaug.evaluation.uncertainty, .chunked) against plain
numpy on whole arrays: softmax and region-based (sigmoid) ensembles, label maps kept in a file, per-fold summaries,
and the memory held while a case is accumulated and finished (numpy's allocations, traced)."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from nnunet_varaug.evaluation import chunked, uncertainty
from nnunet_varaug.evaluation.chunked import LabelMaps
from nnunet_varaug.evaluation.variability import Structure

pytestmark = pytest.mark.unit


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of a few rows, so that every computation below runs over many chunks."""
    monkeypatch.setattr(chunked, "CHUNK_VALUES", 200)
    monkeypatch.setattr(uncertainty, "CHUNK_VALUES", 200)
    monkeypatch.setattr(chunked.row_chunks, "__defaults__", (1, 200))


def softmax(rng, k, c, shape):
    logits = rng.normal(size=(k, c, *shape)) * 2
    logits[:, 0, :2] = 50  # saturated voxels: probabilities of exactly 0 in float32
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def h_bits(q, axis=0):
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.sum(np.where(q > 0, q * np.log2(np.where(q > 0, q, 1)), 0), axis=axis)


def h2_bits(q):
    return h_bits(np.stack([q, 1 - q]))


def test_softmax_ensemble_in_chunks_equals_numpy(small_chunks, tmp_path):
    rng = np.random.default_rng(0)
    probs = softmax(rng, 5, 4, (9, 6, 5))
    ens = uncertainty.RunningEnsemble(maps=LabelMaps(str(tmp_path / "maps.raw")))
    for p in probs:
        ens.add(p.copy(), p.argmax(axis=0), own=True)
    p64 = probs.astype(np.float64)
    mean = ens.finish()
    avg = probs[0].copy()
    for p in probs[1:]:
        avg += p
    avg /= len(probs)
    assert np.array_equal(mean, avg)  # nnUNetv2_ensemble's average_probabilities, bit for bit
    entropy = ens.entropy()
    np.testing.assert_allclose(entropy, h_bits(p64.mean(axis=0)), atol=2e-5)
    mi = np.maximum(h_bits(p64.mean(axis=0)) - np.mean([h_bits(q) for q in p64], axis=0), 0)
    np.testing.assert_allclose(ens.mutual_information(entropy, in_place=True), mi, atol=2e-5)
    consensus = avg.argmax(axis=0)
    np.testing.assert_allclose(ens.disagreement(consensus), (probs.argmax(axis=1) != consensus).mean(axis=0),
                               atol=1e-7)
    assert mi.max() > 0.05


def test_region_ensemble_binary_entropy_and_disagreement_per_region(small_chunks, tmp_path):
    rng = np.random.default_rng(1)
    sig = (1 / (1 + np.exp(-rng.normal(size=(4, 2, 7, 6, 5)) * 3))).astype(np.float32)  # 4 replicas, 2 regions
    sig[:, :, 0] = 1.0  # certain voxels: 0 log 0
    structures = [Structure("whole", (1, 2)), Structure("lesion", (2,))]
    ens = uncertainty.RunningEnsemble(regions=True, maps=LabelMaps(str(tmp_path / "maps.raw")))
    segs = []
    for p in sig:
        seg = np.zeros(p.shape[1:], np.uint8)
        seg[p[0] > 0.5] = 1
        seg[p[1] > 0.5] = 2
        segs.append(seg)
        ens.add(p, seg)
    mean = ens.finish()
    p64 = sig.astype(np.float64)
    consensus = np.zeros(mean.shape[1:], np.uint8)
    consensus[mean[0] > 0.5] = 1
    consensus[mean[1] > 0.5] = 2
    for r, st in enumerate(structures):
        h = ens.entropy(channel=r)
        np.testing.assert_allclose(h, h2_bits(p64[:, r].mean(axis=0)), atol=2e-5)
        mi = h2_bits(p64[:, r].mean(axis=0)) - np.mean([h2_bits(q) for q in p64[:, r]], axis=0)
        np.testing.assert_allclose(ens.mutual_information(h, channel=r), np.maximum(mi, 0), atol=2e-5)
        inside = [np.isin(s, st.labels) for s in segs]
        np.testing.assert_allclose(ens.disagreement(consensus, st),
                                   np.mean([m != np.isin(consensus, st.labels) for m in inside], axis=0), atol=1e-7)
    assert ens.entropy().shape == mean.shape and ens.entropy().max() <= 1.0 + 1e-6


def dice(a, b):
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else 2 * np.logical_and(a, b).sum() / s


def test_summary_per_fold_from_a_file_equals_numpy(small_chunks, tmp_path):
    rng = np.random.default_rng(2)
    base = np.zeros((10, 8, 8), np.uint8)
    base[2:8, 2:6, 2:6] = 1
    base[4:6, 3:5, 3:5] = 2
    maps = np.stack([np.where(rng.random(base.shape) < 0.05, rng.integers(0, 3, base.shape), base)
                     for _ in range(6)]).astype(np.uint8)
    consensus = base
    stored = LabelMaps(str(tmp_path / "maps.raw"))
    for m in maps:
        stored.append(m)
    np.testing.assert_array_equal(stored.rows(3, 7, [1, 4]), maps[[1, 4], 3:7])
    structures = [Structure("organ", (1,)), Structure("lesion", (2,))]
    groups = [[0, 1, 2], [3, 4, 5]]
    whole, folds = uncertainty.summarize_case(stored, consensus, (1.0, 2.0, 0.5), structures, groups)
    for summary, members in [(whole, range(6))] + list(zip(folds, groups)):
        members = list(members)
        for s, st in enumerate(structures):
            masks = [np.isin(maps[m], st.labels) for m in members]
            pairs = [dice(masks[a], masks[b]) for a in range(len(masks)) for b in range(a + 1, len(masks))]
            assert summary.mean_pairwise_dice[s] == pytest.approx(np.mean(pairs))
            assert summary.replica_voxels[s] == [int(m.sum()) for m in masks]
            assert summary.consensus_voxels[s] == int(np.isin(consensus, st.labels).sum())
        assert summary.uncertain_voxels == int(np.any(maps[members] != consensus, axis=0).sum())
    rows = uncertainty.fold_rows("c", [0, 1], folds, structures)
    assert [(r["fold"], r["name"]) for r in rows] == [("0", "organ"), ("0", "lesion"), ("1", "organ"), ("1", "lesion")]
    assert rows[2]["uncertain_volume_mm3"] == folds[1].uncertain_voxels * 1.0


def traced_peak(k: int, tmp_path, shape=(40, 32, 32), classes=4) -> int:
    """Peak bytes numpy allocates, less one replica's probabilities (nnU-Net's own prediction), while K replicas
    of one case are added and the mean, consensus, entropy, mutual information, disagreement and summary are made
    as predict makes them."""
    rng = np.random.default_rng(k)
    structures = [Structure("a", (1,)), Structure("b", (2,)), Structure("c", (3,))]
    ens = uncertainty.RunningEnsemble(maps=LabelMaps(str(tmp_path / f"maps{k}.raw")))
    tracemalloc.start()
    try:
        for _ in range(k):
            p = rng.random((classes, *shape), dtype=np.float32)  # one replica's prediction
            ens.add(p, (p[0] > 0.5).astype(np.uint8), own=True)
            del p
        mean = ens.finish()
        consensus = np.empty(shape, np.uint8)
        for a, b in chunked.row_chunks(shape, classes):
            consensus[a:b] = mean[:, a:b].argmax(axis=0)
        entropy = ens.entropy()
        del mean
        ens.sum = None
        mi = ens.mutual_information(entropy, in_place=True)
        dis = ens.disagreement(consensus)
        uncertainty.summarize_case(ens.maps, consensus, (1, 1, 1), structures)
        del entropy, mi, dis
        return tracemalloc.get_traced_memory()[1] - classes * int(np.prod(shape)) * 4
    finally:
        tracemalloc.stop()


def test_memory_held_does_not_grow_with_k_and_stays_under_two_and_a_half_probability_maps(tmp_path, monkeypatch):
    """The bound of docs/inference.md ("Memory"): beyond one replica's probabilities, at most 2.5 x (classes x
    voxels x 4 bytes), the same for 2 and 12 replicas (the label maps are in a file, the mean is the sum divided
    in place, every temporary is one chunk). Chunks are scaled down with the image (one row of 32 x 32 here; a
    real chunk is 16 MiB, nothing beside a CT's gigabytes)."""
    monkeypatch.setattr(chunked, "CHUNK_VALUES", 4096)
    monkeypatch.setattr(uncertainty, "CHUNK_VALUES", 4096)
    monkeypatch.setattr(chunked.row_chunks, "__defaults__", (1, 4096))
    shape, classes = (40, 32, 32), 4
    voxels = int(np.prod(shape))
    p_bytes = classes * voxels * 4
    two, twelve = traced_peak(2, tmp_path, shape, classes), traced_peak(12, tmp_path, shape, classes)
    assert twelve <= 2.5 * p_bytes, (twelve, p_bytes)
    # the formula of docs/inference.md, P + 13 V, plus a few chunk-sized temporaries (16 KiB each here)
    assert twelve <= p_bytes + 13 * voxels + 8 * 4096 * 4, (twelve, p_bytes + 13 * voxels)
    assert abs(twelve - two) <= 0.1 * p_bytes, (two, twelve)
