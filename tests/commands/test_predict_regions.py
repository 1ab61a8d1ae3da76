"""``predict`` on a region-based dataset (regions "whole" = labels 1+2 and "lesion" = 2, sigmoid outputs) against
nnU-Net's own commands and numpy: two tiny replicas, ``nnUNetv2_predict --save_probabilities`` of each and
``nnUNetv2_ensemble`` of their outputs as the oracle."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from conftest import TINY, plan_and_preprocess, run_cli, run_clis_side_by_side, side_by_side_env
from predict_helpers import arr, main

pytestmark = pytest.mark.e2e

REGION_ID = 141
ENDING = ".nii.gz"
REGIONS = {"whole": (1, 2), "lesion": (2,)}  # dataset.json's regions, in regions_class_order's order (1, 2)


def h2(q):
    """Binary entropy in bits, 0 log 0 = 0, float64."""
    q = np.asarray(q, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(q > 0, q * np.log2(np.where(q > 0, q, 1)), 0)
        u = np.where(q < 1, (1 - q) * np.log2(np.where(q < 1, 1 - q, 1)), 0)
    return -(t + u)


def predict_args(images, out, *extra):
    return ["predict", "-i", str(images), "-o", str(out), "-d", str(REGION_ID), "-c", "3d_fullres", "-f", "0",
            "-n", "2", "-tr", TINY, "-device", "cpu", "--quiet", "-npp", "0", *extra]


@pytest.fixture(scope="module")
def regions(nnunet_env, tmp_path_factory):
    """The region dataset, two tiny replicas (short training), nnU-Net's predictions and ensemble, and predict."""
    from nnunet_varaug.experiments.datasets import make_synthetic_dataset

    raw = make_synthetic_dataset(REGION_ID, name="VarAugRegions", num_cases=5, num_test_cases=2, regions=True,
                                 seed=7)
    plan_and_preprocess(REGION_ID)
    run_cli("nnunet_varaug", "replicas", "-d", str(REGION_ID), "-c", "3d_fullres", "-f", "0", "-n", "2", "-tr", TINY,
            "-device", "cpu", "--devices", "0,1",
            env=side_by_side_env(dict(os.environ, VARAUG_TINY_EPOCHS="2", VARAUG_TINY_ITERATIONS="6")))
    root = tmp_path_factory.mktemp("regions")
    images = root / "images"
    shutil.copytree(os.path.join(raw, "imagesTs"), images)
    names = [f"{TINY}_seed{k}" for k in range(2)]
    folders = [root / n for n in names]
    run_clis_side_by_side(*(("nnUNetv2_predict", "-i", str(images), "-o", str(f), "-d", str(REGION_ID), "-c",
                             "3d_fullres", "-f", "0", "-tr", n, "--save_probabilities", "-device", "cpu", "-npp", "0",
                             "-nps", "0") for n, f in zip(names, folders)))
    run_cli("nnUNetv2_ensemble", "-i", *map(str, folders), "-o", str(root / "ensemble"), "-np", "1", "--save_npz")
    out = root / "out"
    assert main(predict_args(images, out, "--save_probabilities")) == 0
    cases = sorted(f[:-len("_0000" + ENDING)] for f in os.listdir(images))
    return {"raw": raw, "root": root, "images": images, "out": out, "replicas": folders, "cases": cases,
            "ensemble": root / "ensemble"}


def test_consensus_and_probabilities_equal_nnunet_ensemble(regions):
    for case in regions["cases"]:
        ours, theirs = arr(regions["out"] / f"{case}{ENDING}"), arr(regions["ensemble"] / f"{case}{ENDING}")
        assert np.array_equal(ours, theirs), f"{case}: {np.count_nonzero(ours != theirs)} voxels differ"
        assert set(np.unique(ours)) <= {0, 1, 2} and (ours == 2).any()
        p = np.load(regions["out"] / f"{case}.npz")["probabilities"]
        q = np.load(regions["ensemble"] / f"{case}.npz")["probabilities"]
        assert p.shape == q.shape and p.shape[0] == 2 and p.dtype == np.float32
        np.testing.assert_allclose(p, q, atol=1e-5)


def test_per_region_entropy_mi_and_disagreement_equal_numpy(regions):
    maps = regions["out"] / "uncertainty"
    for case in regions["cases"]:
        sig = np.stack([np.load(f / f"{case}.npz")["probabilities"] for f in regions["replicas"]])  # (K, R, ...)
        segs = np.stack([arr(f / f"{case}{ENDING}") for f in regions["replicas"]])
        consensus = arr(regions["ensemble"] / f"{case}{ENDING}")
        for r, (name, labels) in enumerate(REGIONS.items()):
            mean = sig[:, r].astype(np.float64).mean(axis=0)
            entropy = h2(mean)
            mi = entropy - np.mean([h2(q) for q in sig[:, r]], axis=0)
            np.testing.assert_allclose(arr(maps / f"{case}_entropy_{name}.nii.gz"), entropy, atol=5e-4)
            np.testing.assert_allclose(arr(maps / f"{case}_mutual_information_{name}.nii.gz"), np.maximum(mi, 0),
                                       atol=5e-4)
            inside = np.isin(segs, labels) != np.isin(consensus, labels)[None]
            np.testing.assert_allclose(arr(maps / f"{case}_disagreement_{name}.nii.gz"), inside.mean(axis=0),
                                       atol=1e-6)
            assert entropy.max() > 0.1  # the replicas are unsure somewhere
        np.testing.assert_allclose(arr(maps / f"{case}_disagreement.nii.gz"), (segs != consensus).mean(axis=0),
                                   atol=1e-6)


def test_volumes_per_region(regions):
    import pandas as pd

    table = pd.read_csv(regions["out"] / "volumes.csv", dtype={"label": str})
    assert sorted(set(table["label"])) == ["1+2", "2"]
    for case in regions["cases"]:
        segs = [arr(f / f"{case}{ENDING}") for f in regions["replicas"]]
        consensus = arr(regions["ensemble"] / f"{case}{ENDING}")
        for name, labels in REGIONS.items():
            row = table[(table["case"] == case) & (table["name"] == name)].iloc[0]
            v = np.array([np.isin(s, labels).sum() for s in segs], dtype=float)
            assert row["consensus_mm3"] == pytest.approx(np.isin(consensus, labels).sum())
            assert row["replica_mean_mm3"] == pytest.approx(v.mean())


def test_calibration_is_refused_for_regions_before_writing(regions, tmp_path, capsys):
    out = tmp_path / "out"
    labels = os.path.join(regions["raw"], "labelsTs")
    assert main(predict_args(regions["images"], out, "-l", labels)) == 2
    err = capsys.readouterr().err
    assert "region-based" in err and "leave out -l" in err
    assert not out.exists()


def test_analyze_reports_each_region(regions, tmp_path):
    """analyze on the region dataset: its predictions are nnUNetv2_predict's, and pairs.csv holds each region's
    Dice between the two replicas as numpy computes it from their label maps."""
    import pandas as pd

    out = tmp_path / "analysis"
    assert main(["analyze", "-d", str(REGION_ID), "-c", "3d_fullres", "-f", "0", "-n", "2", "-tr", TINY, "-i",
                 str(regions["images"]), "-o", str(out), "-device", "cpu", "--quiet"]) == 0
    pairs = pd.read_csv(out / "pairs.csv", dtype={"label": str})
    assert sorted(set(pairs["label"])) == ["1+2", "2"]
    for case in regions["cases"]:
        segs = [arr(f / f"{case}{ENDING}") for f in regions["replicas"]]
        for k, s in enumerate(segs):  # analyze's cached predictions are nnUNetv2_predict's
            assert np.array_equal(arr(out / "predictions" / f"{TINY}_seed{k}" / f"{case}{ENDING}"), s)
        for labels in REGIONS.values():
            a, b = np.isin(segs[0], labels), np.isin(segs[1], labels)
            want = 1.0 if a.sum() + b.sum() == 0 else 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())
            row = pairs[(pairs["case"] == case) & (pairs["label"] == "+".join(map(str, labels)))].iloc[0]
            assert row["dice"] == pytest.approx(want)
