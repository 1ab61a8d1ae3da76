"""``predict -f 0 1`` against nnU-Net's own commands: ``nnUNetv2_predict --save_probabilities`` of each of the 4
models and ``nnUNetv2_ensemble`` of all 4 (the oracle); ``nnUNetv2_ensemble`` of two ``predict`` outputs (one per
fold); numpy for the per-fold breakdown.

The models: two of the shared seed replicas (fold 0 of Dataset101) and, as their fold 1, copies of them with
Gaussian noise on the weights, in a copy of the results folder (what is compared is how the F x K models'
probabilities are combined, which does not depend on how the weights were trained)."""
from __future__ import annotations

import os
import pickle
import shutil

import numpy as np
import pytest

from conftest import TINY, run_cli, run_clis_side_by_side
from predict_helpers import arr, main

pytestmark = pytest.mark.e2e

ENDING = ".nii.gz"
NAMES = [f"{TINY}_seed{k}" for k in range(2)]


DATASET_ID = 101


def predict(images, out, *folds):
    return main(["predict", "-i", str(images), "-o", str(out), "-d", str(DATASET_ID), "-c", "3d_fullres", "-f",
                 *map(str, folds), "-n", "2", "-tr", TINY, "-device", "cpu", "--quiet", "-npp", "0",
                 "--save_probabilities"])


def results_with_fold_1(seed_replicas, root) -> str:
    """A copy of the replicas' results folder where each of NAMES (not the third replica) also has a fold 1: its
    fold 0 checkpoint with noise (0.05 x each tensor's standard deviation) on the weights."""
    import torch

    results = root / "results"
    gen = torch.Generator().manual_seed(0)
    for name in seed_replicas["names"]:
        folder = f"{name}__nnUNetPlans__3d_fullres"
        dst = results / os.path.basename(seed_replicas["results"]) / folder
        shutil.copytree(os.path.join(seed_replicas["results"], folder), dst,
                        ignore=shutil.ignore_patterns("validation", "*.png", "checkpoint_latest.pth"))
        if name not in NAMES:
            continue
        ckpt = torch.load(dst / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
        ckpt["network_weights"] = {k: (w + 0.05 * w.std(unbiased=False) * torch.randn(w.shape, generator=gen)
                                       if w.is_floating_point() and w.numel() > 1 else w.clone())
                                   for k, w in ckpt["network_weights"].items()}
        (dst / "fold_1").mkdir()
        torch.save(ckpt, dst / "fold_1" / "checkpoint_final.pth")
    return str(results)


@pytest.fixture(scope="module")
def folds(seed_replicas, tmp_path_factory):
    root = tmp_path_factory.mktemp("folds")
    images = root / "images"
    shutil.copytree(os.path.join(seed_replicas["raw"], "imagesTs"), images)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("nnUNet_results", results_with_fold_1(seed_replicas, root))
        for f in (0, 1):
            assert predict(images, root / f"fold{f}", f) == 0
        assert predict(images, root / "both", 0, 1) == 0
        models = [(f, n, root / f"nnunet_f{f}_{n}") for f in (0, 1) for n in NAMES]
        run_clis_side_by_side(*(("nnUNetv2_predict", "-i", str(images), "-o", str(o), "-d", str(DATASET_ID), "-c",
                                 "3d_fullres", "-f", str(f), "-tr", n, "--save_probabilities", "-device", "cpu",
                                 "-npp", "0", "-nps", "0") for f, n, o in models))
        run_cli("nnUNetv2_ensemble", "-i", *[str(o) for _, _, o in models], "-o", str(root / "oracle"), "-np", "1")
        run_cli("nnUNetv2_ensemble", "-i", str(root / "fold0"), str(root / "fold1"), "-o", str(root / "of_outputs"),
                "-np", "1", "--save_npz")
        cases = sorted(f[:-len("_0000" + ENDING)] for f in os.listdir(images))
        yield {"root": root, "images": images, "models": models, "cases": cases}


def test_consensus_of_folds_equals_nnunet_ensemble_of_every_model(folds):
    root = folds["root"]
    for case in folds["cases"]:
        ours, theirs = arr(root / "both" / f"{case}{ENDING}"), arr(root / "oracle" / f"{case}{ENDING}")
        assert np.array_equal(ours, theirs), f"{case}: {np.count_nonzero(ours != theirs)} voxels differ"
        mean = np.mean([np.load(o / f"{case}.npz")["probabilities"] for _, _, o in folds["models"]], axis=0)
        np.testing.assert_allclose(np.load(root / "both" / f"{case}.npz")["probabilities"], mean, atol=1e-5)


def test_nnunet_ensemble_of_two_predict_outputs_equals_predict_over_both(folds):
    """Two equal-sized sets: the mean of the two means is the mean over all four models (to float rounding)."""
    root = folds["root"]
    for case in folds["cases"]:
        theirs = np.load(root / "of_outputs" / f"{case}.npz")["probabilities"]
        ours = np.load(root / "both" / f"{case}.npz")["probabilities"]
        np.testing.assert_allclose(ours, theirs, atol=1e-6)
        seg_ours, seg_theirs = arr(root / "both" / f"{case}{ENDING}"), arr(root / "of_outputs" / f"{case}{ENDING}")
        top2 = np.sort(ours, axis=0)[-2:]
        near_tie = (top2[1] - top2[0]) < 1e-5
        assert np.array_equal(seg_ours[~near_tie], seg_theirs[~near_tie])
        with open(root / "both" / f"{case}.pkl", "rb") as f:
            ours_props = pickle.load(f)
        with open(root / "of_outputs" / f"{case}.pkl", "rb") as f:
            assert pickle.load(f).keys() == ours_props.keys()


def dice(a, b):
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else 2 * np.logical_and(a, b).sum() / s


def test_per_fold_breakdown_equals_numpy(folds):
    import pandas as pd

    root = folds["root"]
    table = pd.read_csv(root / "both" / "folds.csv", dtype={"label": str, "fold": str})
    assert len(table) == len(folds["cases"]) * 2 * 2  # cases x folds x structures
    for case in folds["cases"]:
        consensus = arr(root / "oracle" / f"{case}{ENDING}")
        for fold in (0, 1):
            segs = [arr(o / f"{case}{ENDING}") for f, _, o in folds["models"] if f == fold]
            for label in (1, 2):
                row = table[(table["case"] == case) & (table["fold"] == str(fold))
                            & (table["label"] == str(label))].iloc[0]
                assert row["mean_pairwise_dice"] == pytest.approx(dice(segs[0] == label, segs[1] == label))
                assert row["replica_mean_mm3"] == pytest.approx(np.mean([(s == label).sum() for s in segs]))
                differ = np.any(np.stack(segs) != consensus, axis=0).sum()
                assert row["uncertain_volume_mm3"] == pytest.approx(differ)
    review = pd.read_csv(root / "both" / "review.csv")
    assert sorted(review["case"]) == folds["cases"]


def test_missing_replicas_of_a_fold_are_refused(folds, tmp_path, capsys):
    """seed2 exists for fold 0 only."""
    out = tmp_path / "out"
    rc = main(["predict", "-i", str(folds["images"]), "-o", str(out), "-d", str(DATASET_ID), "-c", "3d_fullres",
               "-f", "0", "1", "-n", "3", "-tr", TINY, "-device", "cpu", "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "fold 1" in err and f"{TINY}_seed2" in err and "nnunet_varaug replicas" in err
    assert not out.exists()
