"""``nnunet_varaug predict`` against nnU-Net's own commands and plain numpy/SimpleITK.

One predict run (module scope) on Dataset101's two test images plus an anisotropic copy with a non-trivial
origin and direction, with labels; the oracle is ``nnUNetv2_predict --save_probabilities`` of each replica and
``nnUNetv2_ensemble`` of their outputs.
"""
from __future__ import annotations

import glob
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import TINY, run_cli, run_clis_side_by_side

pytestmark = pytest.mark.e2e

ENDING = ".nii.gz"


def predict_args(images, out, n=3, labels=None):
    args = ["predict", "-i", str(images), "-o", str(out), "-d", "101", "-c", "3d_fullres", "-f", "0", "-n", str(n),
            "-tr", TINY, "-device", "cpu", "--quiet"]
    return args + (["-l", str(labels)] if labels else [])


def main(args):
    from nnunet_varaug.cli import main as cli_main

    import torch

    threads = torch.get_num_threads()
    try:
        return cli_main(args)
    finally:
        torch.set_num_threads(threads)


def read(path):
    return sitk.ReadImage(str(path))


def arr(path):
    return sitk.GetArrayFromImage(read(path))


@pytest.fixture(scope="module")
def predicted(seed_replicas, tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    images, labels = root / "images", root / "labels"
    shutil.copytree(os.path.join(seed_replicas["raw"], "imagesTs"), images)
    shutil.copytree(os.path.join(seed_replicas["raw"], "labelsTs"), labels)
    # an anisotropic case with a non-trivial origin and direction (x flipped)
    for src, dst in ((images / "case_ts000_0000.nii.gz", images / "aniso_0000.nii.gz"),
                     (labels / "case_ts000.nii.gz", labels / "aniso.nii.gz")):
        img = read(src)
        img.SetSpacing((0.8, 1.1, 2.5))
        img.SetOrigin((-20.5, 13.25, 7.0))
        img.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1))
        sitk.WriteImage(img, str(dst))
    out = root / "out"
    assert main(predict_args(images, out, labels=labels)) == 0
    folders = [root / name for name in seed_replicas["names"]]
    # nnU-Net's own predictions of each replica (the oracle), the three commands side by side
    run_clis_side_by_side(*(("nnUNetv2_predict", "-i", str(images), "-o", str(folder), "-d", "101", "-c", "3d_fullres",
                             "-f", "0", "-tr", name, "--save_probabilities", "-device", "cpu", "-npp", "0", "-nps", "0")
                            for name, folder in zip(seed_replicas["names"], folders)))
    run_cli("nnUNetv2_ensemble", "-i", *map(str, folders), "-o", str(root / "ensemble"), "-np", "1")
    cases = sorted(os.path.basename(f)[: -len(ENDING)] for f in glob.glob(str(labels / f"*{ENDING}")))
    return {"root": root, "images": images, "labels": labels, "out": out, "replicas": folders,
            "ensemble": root / "ensemble", "cases": cases}


def probabilities(predicted, case):
    return [np.load(f / f"{case}.npz")["probabilities"] for f in predicted["replicas"]]


def test_consensus_equals_nnunet_ensemble(predicted):
    for case in predicted["cases"]:
        ours, theirs = arr(predicted["out"] / f"{case}{ENDING}"), arr(predicted["ensemble"] / f"{case}{ENDING}")
        assert ours.shape == theirs.shape
        assert np.array_equal(ours, theirs), f"{case}: {np.count_nonzero(ours != theirs)} voxels differ"


def test_uncertainty_maps_equal_numpy(predicted):
    for case in predicted["cases"]:
        p = np.stack(probabilities(predicted, case)).astype(np.float64)  # (K, C, *spatial)
        mean = p.mean(axis=0)

        def h(q):
            return -np.sum(np.where(q > 0, q * np.log2(np.where(q > 0, q, 1)), 0), axis=0)

        entropy = h(mean)
        mi = entropy - np.mean([h(q) for q in p], axis=0)
        segs = np.stack([arr(f / f"{case}{ENDING}") for f in predicted["replicas"]])
        consensus = arr(predicted["ensemble"] / f"{case}{ENDING}")
        maps = predicted["out"] / "uncertainty"
        # 5e-4 bits: nnUNetv2_predict's separate processes and predict's in-process run may sum in other orders
        # (one suite run under load: 17 of 32768 voxels differed, by up to 1.3e-4); nats instead of bits is 0.3
        np.testing.assert_allclose(arr(maps / f"{case}_entropy.nii.gz"), entropy, atol=5e-4)
        np.testing.assert_allclose(arr(maps / f"{case}_mutual_information.nii.gz"), np.maximum(mi, 0), atol=5e-4)
        np.testing.assert_allclose(arr(maps / f"{case}_disagreement.nii.gz"), (segs != consensus).mean(axis=0),
                                   atol=1e-6)
        assert entropy.max() > 0.1  # the tiny replicas are unsure somewhere: the comparison is not trivial


def test_outputs_are_in_the_input_grid(predicted):
    assert "aniso" in predicted["cases"]
    for case in predicted["cases"]:
        image = read(predicted["images"] / f"{case}_0000{ENDING}")
        files = [predicted["out"] / f"{case}{ENDING}"] + [predicted["out"] / "uncertainty" / f"{case}_{w}.nii.gz"
                                                          for w in ("entropy", "mutual_information", "disagreement")]
        for f in files:
            out = read(f)
            assert out.GetSize() == image.GetSize(), f
            np.testing.assert_allclose(out.GetSpacing(), image.GetSpacing(), atol=1e-6, err_msg=str(f))
            np.testing.assert_allclose(out.GetOrigin(), image.GetOrigin(), atol=1e-5, err_msg=str(f))
            np.testing.assert_allclose(out.GetDirection(), image.GetDirection(), atol=1e-6, err_msg=str(f))


def test_volumes_are_voxel_counts_times_voxel_volume(predicted):
    import pandas as pd

    table = pd.read_csv(predicted["out"] / "volumes.csv", dtype={"label": str})
    assert sorted(table["case"].unique()) == predicted["cases"]
    for case in predicted["cases"]:
        voxel = float(np.prod(read(predicted["images"] / f"{case}_0000{ENDING}").GetSpacing()))
        segs = [arr(f / f"{case}{ENDING}") for f in predicted["replicas"]]
        consensus = arr(predicted["ensemble"] / f"{case}{ENDING}")
        for label in (1, 2):
            row = table[(table["case"] == case) & (table["label"] == str(label))].iloc[0]
            v = np.array([np.count_nonzero(s == label) for s in segs]) * voxel
            assert row["consensus_mm3"] == pytest.approx(np.count_nonzero(consensus == label) * voxel)
            assert row["replica_min_mm3"] == pytest.approx(v.min())
            assert row["replica_max_mm3"] == pytest.approx(v.max())
            assert row["replica_mean_mm3"] == pytest.approx(v.mean())
            assert row["replica_std_mm3"] == pytest.approx(v.std(ddof=1))


def hand_ece_brier(pairs, bins=10):
    """ECE and Brier of (probability, outcome) arrays, by explicit loops over bins."""
    p = np.concatenate([a for a, _ in pairs]).astype(np.float64)
    y = np.concatenate([b for _, b in pairs]).astype(np.float64)
    ece = 0.0
    for b in range(bins):
        inside = (p >= b / bins) & ((p < (b + 1) / bins) if b < bins - 1 else (p <= 1.0))
        if inside.any():
            ece += inside.sum() / p.size * abs(y[inside].mean() - p[inside].mean())
    return ece, float(np.mean((p - y) ** 2))


def test_calibration_csv_matches_hand_computation(predicted):
    import pandas as pd

    table = pd.read_csv(predicted["out"] / "calibration.csv", dtype={"label": str})
    names = [os.path.basename(f) for f in predicted["replicas"]]
    assert list(dict.fromkeys(table["model"])) == names + ["ensemble"]
    probs = {c: probabilities(predicted, c) for c in predicted["cases"]}
    gts = {c: arr(predicted["labels"] / f"{c}{ENDING}") for c in predicted["cases"]}
    for m, model in enumerate(names + ["ensemble"]):
        for label in (0, 1, 2):
            pairs = []
            for c in predicted["cases"]:
                p = probs[c][m] if model != "ensemble" else np.mean(np.stack(probs[c]), axis=0)
                pairs.append((p[label].ravel(), (gts[c] == label).ravel()))
            ece, brier = hand_ece_brier(pairs)
            row = table[(table["model"] == model) & (table["label"] == str(label)) & (table["scope"] == "all")].iloc[0]
            assert row["classwise_ece"] == pytest.approx(ece, abs=1e-5), (model, label)
            assert row["brier"] == pytest.approx(brier, abs=1e-6), (model, label)


def test_review_ranks_by_the_size_aware_score(predicted):
    """review.csv's score by hand (docs/inference.md): per structure (1 − mean pairwise Dice) × min(1, mean replica
    volume / 100 mm³), 1 for a structure no replica finds; the case's score is the largest."""
    import pandas as pd

    table = pd.read_csv(predicted["out"] / "review.csv")
    expected = {}
    for case in predicted["cases"]:
        segs = [arr(f / f"{case}{ENDING}") for f in predicted["replicas"]]
        voxel = float(np.prod(read(predicted["images"] / f"{case}_0000{ENDING}").GetSpacing()))
        scores = []
        for label in (1, 2):
            dices = []
            for a in range(len(segs)):
                for b in range(a + 1, len(segs)):
                    x, y = segs[a] == label, segs[b] == label
                    s = x.sum() + y.sum()
                    dices.append(1.0 if s == 0 else 2 * np.logical_and(x, y).sum() / s)
            volume = np.mean([(seg == label).sum() * voxel for seg in segs])
            scores.append(1.0 if volume == 0 else (1 - float(np.mean(dices))) * min(1.0, volume / 100.0))
        expected[case] = max(scores)
    for _, row in table.iterrows():
        assert row["score"] == pytest.approx(expected[row["case"]], abs=1e-9)
    assert list(table["score"]) == sorted(table["score"], reverse=True)
    assert list(table["rank"]) == list(range(1, len(expected) + 1))


def test_report_embeds_pictures_and_calibration(predicted):
    text = (predicted["out"] / "report.html").read_text()
    # pictures + reliability diagram + risk-coverage curves
    assert text.count("data:image/png;base64,") == len(predicted["cases"]) + 2
    for section in ("structures", "review", "failures", "volumes", "calibration", "pictures"):
        assert f"<!-- section:{section} -->" in text


def test_rerun_skips_and_a_changed_checkpoint_predicts_again(predicted, seed_replicas, tmp_path, monkeypatch,
                                                             capsys):
    import torch

    base = _results_copy(seed_replicas, tmp_path, monkeypatch)
    out = tmp_path / "out"
    shutil.copytree(predicted["out"], out)
    target = out / f"case_ts000{ENDING}"
    before = target.stat().st_mtime_ns
    assert main(predict_args(predicted["images"], out, labels=predicted["labels"])) == 0
    assert "predicted 0 case(s), skipped 3" in capsys.readouterr().out
    assert target.stat().st_mtime_ns == before

    ckpt = base / f"{seed_replicas['names'][1]}__nnUNetPlans__3d_fullres" / "fold_0" / "checkpoint_final.pth"
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    for w in saved["network_weights"].values():
        if w.is_floating_point():
            w.mul_(1.5)
    torch.save(saved, ckpt)
    assert main(predict_args(predicted["images"], out, labels=predicted["labels"])) == 0
    assert "predicted 3 case(s), skipped 0" in capsys.readouterr().out
    assert target.stat().st_mtime_ns != before


def _results_copy(seed_replicas, tmp_path, monkeypatch):
    results = tmp_path / "results"
    src = seed_replicas["results"]
    for name in seed_replicas["names"]:
        folder = f"{name}__nnUNetPlans__3d_fullres"
        shutil.copytree(os.path.join(src, folder), results / os.path.basename(src) / folder,
                        ignore=shutil.ignore_patterns("validation", "*.png", "checkpoint_latest.pth"))
    monkeypatch.setenv("nnUNet_results", str(results))
    return results / os.path.basename(src)


@pytest.mark.parametrize("problem", ["missing_replica", "other_plans", "extra_channel", "multichannel_file",
                                     "output_is_input", "output_inside_input", "label_of_other_grid"])
def test_bad_input_is_refused_and_nothing_written(problem, predicted, seed_replicas, tmp_path, monkeypatch, capsys):
    import json

    images, labels, n = tmp_path / "images", None, 3
    shutil.copytree(predicted["images"], images)
    out = tmp_path / "out"
    expect = {"missing_replica": "nnunet_varaug replicas", "other_plans": "other plans",
              "extra_channel": "channel file", "multichannel_file": "one file per channel",
              "output_is_input": "input folder", "output_inside_input": "input folder",
              "label_of_other_grid": "not the label"}[problem]
    if problem == "missing_replica":
        n = 4
    elif problem == "other_plans":
        base = _results_copy(seed_replicas, tmp_path, monkeypatch)
        plans_file = base / f"{seed_replicas['names'][2]}__nnUNetPlans__3d_fullres" / "plans.json"
        plans = json.loads(plans_file.read_text())
        plans["configurations"]["3d_fullres"]["patch_size"] = [16, 16, 16]
        plans_file.write_text(json.dumps(plans))
    elif problem == "extra_channel":
        shutil.copy(images / "case_ts000_0000.nii.gz", images / "case_ts000_0001.nii.gz")
    elif problem == "multichannel_file":
        img = read(images / "case_ts001_0000.nii.gz")
        sitk.WriteImage(sitk.Compose(img, img), str(images / "case_ts001_0000.nii.gz"))
    elif problem == "output_is_input":
        out = images
    elif problem == "output_inside_input":
        out = images / "predictions"
    elif problem == "label_of_other_grid":
        labels = tmp_path / "labels"
        shutil.copytree(predicted["labels"], labels)
        sitk.WriteImage(sitk.Image(8, 8, 8, sitk.sitkUInt8), str(labels / "case_ts001.nii.gz"))
    listing = sorted(os.listdir(images))
    rc = main(predict_args(images, out, n=n, labels=labels))
    err = capsys.readouterr().err
    assert rc == 2
    assert expect in err, err
    assert sorted(os.listdir(images)) == listing
    if out != images:
        assert not out.exists()
