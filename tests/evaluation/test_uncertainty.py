"""Ensemble uncertainty math (nnunet_varaug.evaluation.uncertainty) against direct numpy computations."""
from __future__ import annotations

import numpy as np
import pytest

from nnunet_varaug.evaluation import uncertainty
from nnunet_varaug.evaluation.variability import Structure

pytestmark = pytest.mark.unit


def random_probs(rng, k=4, c=3, shape=(5, 6, 7)):
    logits = rng.normal(size=(k, c, *shape)) * 2
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def test_entropy_bits_matches_definition():
    p = np.array([[1.0, 0.5, 0.25], [0.0, 0.5, 0.25], [0.0, 0.0, 0.5]], dtype=np.float32)
    np.testing.assert_allclose(uncertainty.entropy_bits(p), [0.0, 1.0, 1.5], atol=1e-7)


def test_running_ensemble_equals_numpy():
    rng = np.random.default_rng(0)
    probs = random_probs(rng)
    ens = uncertainty.RunningEnsemble()
    for p in probs:
        ens.add(p, p.argmax(axis=0))
    p64 = probs.astype(np.float64)
    mean = p64.mean(axis=0)
    h = lambda q: -(q * np.log2(q)).sum(axis=0)  # noqa: E731  (no zeros in softmax outputs)
    entropy = h(mean)
    mi = entropy - np.mean([h(q) for q in p64], axis=0)
    np.testing.assert_allclose(ens.mean(), mean, atol=1e-6)
    np.testing.assert_allclose(ens.entropy(), entropy, atol=1e-5)
    np.testing.assert_allclose(ens.mutual_information(ens.entropy()), np.maximum(mi, 0), atol=1e-5)
    consensus = mean.argmax(axis=0)
    np.testing.assert_allclose(ens.disagreement(consensus), (probs.argmax(axis=1) != consensus).mean(axis=0))
    assert mi.max() > 0.05  # replicas do disagree here


def test_mean_follows_nnunet_ensemble_float32_order():
    """The sum is float32 in replica order, divided once: exactly average_probabilities of nnUNetv2_ensemble."""
    rng = np.random.default_rng(1)
    probs = random_probs(rng, k=5)
    avg = probs[0].astype(np.float32).copy()
    for p in probs[1:]:
        avg += p
    avg /= len(probs)
    ens = uncertainty.RunningEnsemble()
    for p in probs:
        ens.add(p, p.argmax(axis=0))
    assert np.array_equal(ens.mean(), avg)


def test_identical_replicas_have_no_mutual_information():
    rng = np.random.default_rng(2)
    p = random_probs(rng, k=1)[0]
    ens = uncertainty.RunningEnsemble()
    for _ in range(4):
        ens.add(p, p.argmax(axis=0))
    e = ens.entropy()
    np.testing.assert_allclose(ens.mutual_information(e), 0, atol=1e-6)
    np.testing.assert_allclose(e, uncertainty.entropy_bits(p), atol=1e-6)


STRUCTURES = [Structure("organ", (1,)), Structure("lesion", (2,))]


def test_summary_volumes_and_dice():
    maps = np.zeros((3, 4, 4, 4), dtype=np.uint8)
    maps[:, :2] = 1          # organ: 32 voxels in all replicas
    maps[0, 3, 0, :2] = 2    # lesion: 2, 1, 0 voxels
    maps[1, 3, 0, 0] = 2
    consensus = np.zeros((4, 4, 4), dtype=np.uint8)
    consensus[:2] = 1
    s = uncertainty.summarize_case(maps, consensus, (2.0, 1.0, 0.5), STRUCTURES)
    assert s.voxel_volume == 1.0
    assert s.replica_voxels == [[32, 32, 32], [2, 1, 0]]
    assert s.consensus_voxels == [32, 0]
    # lesion Dice: (0,1) 2*1/3, (0,2) 0, (1,2) 0
    assert s.mean_pairwise_dice == pytest.approx([1.0, (2 / 3) / 3])
    assert s.uncertain_voxels == 2
    rows = uncertainty.volume_rows("c", s, STRUCTURES)
    assert rows[1]["replica_mean_mm3"] == pytest.approx(1.0)
    assert rows[1]["replica_std_mm3"] == pytest.approx(np.std([2, 1, 0], ddof=1))


def test_review_ranks_planted_doubtful_case_first():
    rng = np.random.default_rng(3)
    summaries = {}
    for i in range(6):
        base = np.zeros((12, 12, 12), dtype=np.uint8)
        base[3:9, 3:9, 3:9] = 1
        base[5:7, 5:7, 5:7] = 2
        maps = np.stack([base] * 4)
        flips = rng.random(maps.shape) < 0.01  # a little noise everywhere
        maps[flips] = 1
        if i == 4:  # the planted doubtful case: replicas place the lesion in different spots
            for k in range(4):
                maps[k][maps[k] == 2] = 1
                maps[k, 3 + k:5 + k, 3:5, 3:5] = 2
        consensus = maps[0]
        summaries[f"case{i}"] = uncertainty.summarize_case(maps, consensus, (1, 1, 1), STRUCTURES)
    rows = uncertainty.review_rows(summaries, STRUCTURES, flag_above=0.5)
    assert rows[0]["case"] == "case4"
    assert rows[0]["least_agreeing_structure"] == "lesion"
    assert [r["flagged"] for r in rows] == [True] + [False] * 5
    assert [r["rank"] for r in rows] == list(range(1, 7))
    assert all(rows[i]["score"] >= rows[i + 1]["score"] for i in range(5))


def test_worst_slice_and_picture(tmp_path):
    from nnunet_varaug.report import overlays

    shape = (6, 10, 10)
    disagreement = np.zeros(shape, np.float32)
    disagreement[4, 2:5, 2:5] = 1 / 3
    disagreement[1, 0, 0] = 2 / 3
    entropy = disagreement * 1.5
    consensus = np.zeros(shape, np.uint8)
    consensus[:, 3:7, 3:7] = 1
    assert overlays.worst_slice(disagreement, entropy, consensus) == 4
    assert overlays.worst_slice(np.zeros(shape), entropy, consensus) == 4  # falls back to entropy
    assert overlays.worst_slice(np.zeros(shape), np.zeros(shape), consensus * (np.arange(6) == 2)[:, None, None]) == 2
    png = overlays.render_case(str(tmp_path / "c.png"), np.random.default_rng(0).random(shape), consensus, entropy,
                               disagreement, (2.0, 1.0, 1.0), "c", [("organ", (1,))])
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert 'src="data:image/png;base64,' in overlays.section_html([("c", png)], "note")
