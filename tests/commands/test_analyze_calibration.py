"""``analyze`` on the fold's validation cases of three tiny replicas: structures.csv, lesions, failure detection and
``--calibration`` reusing the probabilities of the same prediction pass (issue 19), checked against independent
computations (the stored mean probabilities, the predictions on disk, nnUNetv2_predict with the same flags)."""
from __future__ import annotations

import json
import os

import nibabel
import numpy as np
import pandas as pd
import pytest

from conftest import TINY, run_cli

pytestmark = pytest.mark.e2e

FLAGS = ["-c", "3d_fullres", "-f", "0", "-n", "3", "-tr", TINY, "-device", "cpu", "--quiet", "--disable_tta",
         "-step_size", "0.75"]


def _main(*args):
    import torch

    from nnunet_varaug import cli

    threads = torch.get_num_threads()
    try:
        return cli.main(["analyze", *args])
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def calibrated(seed_replicas, tmp_path_factory):
    out = tmp_path_factory.mktemp("analyze_cal") / "report"
    dataset = str(seed_replicas["id"])
    assert _main("-d", dataset, *FLAGS, "-o", str(out)) == 0  # first without --calibration
    pred = out / "predictions" / seed_replicas["names"][0]
    stamps = {f: os.stat(pred / f).st_mtime_ns for f in os.listdir(pred) if f.endswith(".nii.gz")}
    assert _main("-d", dataset, *FLAGS, "-o", str(out), "--calibration", "--instances", "lesion",
                 "--may-be-absent", "lesion", "--failure-dice", "0.9") == 0
    restamped = {f: os.stat(pred / f).st_mtime_ns for f in stamps}
    return {**seed_replicas, "out": out, "stamps": stamps, "restamped": restamped}


def _val_cases(info):
    with open(os.path.join(os.environ["nnUNet_preprocessed"], info["name"], "splits_final.json")) as f:
        return sorted(json.load(f)[0]["val"])


def test_calibration_reuses_the_prediction_pass(calibrated):
    assert calibrated["restamped"] == calibrated["stamps"]  # nothing predicted twice
    record = json.loads((calibrated["out"] / "predictions" / calibrated["names"][0] / "varaug_predictions.json")
                        .read_text())
    assert record["tta"] is False and record["step_size"] == 0.75


def test_ensemble_calibration_equals_the_stored_mean_probabilities(calibrated):
    """The ensemble row against a plain computation from the stored mean (probsums) and the labels."""
    table = pd.read_csv(calibrated["out"] / "calibration.csv", dtype={"label": str})
    p_all, y_all = [], []
    for case in _val_cases(calibrated):
        with np.load(calibrated["out"] / "predictions" / "_probabilities" / "seed" / f"{case}.npz") as f:
            mean = f["mean"]  # (C, z, y, x) in the image grid
        gt = np.asarray(nibabel.load(os.path.join(calibrated["raw"], "labelsTr", case + ".nii.gz")).dataobj)
        p_all.append(mean.reshape(3, -1))
        y_all.append(gt.transpose(2, 1, 0).reshape(-1))  # nibabel (x, y, z) -> (z, y, x)
    p, y = np.concatenate(p_all, axis=1).astype(np.float64), np.concatenate(y_all)
    row = table[(table["model"] == "ensemble") & (table["label"] == "all") & (table["scope"] == "all")].iloc[0]
    assert row["nll"] == pytest.approx(-np.log(np.maximum(p[y, np.arange(y.size)], 1e-12)).mean(), rel=1e-5)
    assert row["brier"] == pytest.approx(((p - (np.arange(3)[:, None] == y)) ** 2).sum(0).mean(), rel=1e-5)
    conf, hit = p.max(0), (p.argmax(0) == y)
    bins = np.minimum((conf * 10).astype(int), 9)
    ece = sum((bins == b).mean() * abs(hit[bins == b].mean() - conf[bins == b].mean()) for b in range(10)
              if (bins == b).any())
    assert row["top_label_ece"] == pytest.approx(ece, abs=1e-5)
    assert set(table["model"]) == set(calibrated["names"]) | {"ensemble"} and set(table["scope"]) == {"all", "roi"}


def test_temperature_is_fitted_and_recorded_where_predict_finds_it(calibrated):
    fits = json.loads((calibrated["out"] / "temperature.json").read_text())
    fit = fits["seed"]
    assert 0.05 < fit["temperature"] < 20 and fit["nll_at_fit"] <= fit["nll_at_1"] + 1e-12
    assert os.path.isfile(fit["path"]) and fit["tta"] is False and fit["step_size"] == 0.75
    assert sorted(fit["cases_fitted"]) == _val_cases(calibrated)
    html = (calibrated["out"] / "report.html").read_text()
    assert "Temperature scaling" in html and "<!-- section:calibration -->" in html


def test_structures_lesions_and_failure_detection(calibrated):
    out = calibrated["out"]
    s = pd.read_csv(out / "structures.csv", dtype={"label": str})
    val = _val_cases(calibrated)
    assert sorted(s["case"].unique()) == val and set(s["name"]) == {"organ", "lesion"}
    for case in val:  # consensus = argmax of the stored mean; its Dice to the labels
        with np.load(out / "predictions" / "_probabilities" / "seed" / f"{case}.npz") as f:
            consensus = f["mean"].argmax(0)
        gt = np.asarray(nibabel.load(os.path.join(calibrated["raw"], "labelsTr", case + ".nii.gz")).dataobj)
        gt = gt.transpose(2, 1, 0)
        row = s[(s["case"] == case) & (s["label"] == "1")].iloc[0]
        a, b = consensus == 1, gt == 1
        assert row["dice_to_labels"] == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()))
        assert row["consensus_mm3"] == pytest.approx(a.sum() * row["consensus_mm3"] / max(a.sum(), 1))
    fd = pd.read_csv(out / "failure_detection.csv")
    assert set(fd["level"]) >= {"case", "structure: organ"} and (fd["failure_dice"] == 0.9).all()
    assert (out / "review_thresholds.csv").exists() and (out / "figures" / "risk_coverage.png").exists()
    counts = pd.read_csv(out / "lesion_counts.csv")
    assert sorted(counts["case"]) == val
    html = (out / "report.html").read_text()
    for sid in ("structures", "review", "failures", "lesions"):
        assert f"<!-- section:{sid} -->" in html


def test_predictions_equal_nnunet_predict_with_the_same_flags(calibrated, tmp_path):
    name = calibrated["names"][1]
    images = tmp_path / "images"
    images.mkdir()
    case = _val_cases(calibrated)[0]
    os.symlink(os.path.join(calibrated["raw"], "imagesTr", case + "_0000.nii.gz"), images / f"{case}_0000.nii.gz")
    run_cli("nnUNetv2_predict", "-i", str(images), "-o", str(tmp_path / "o"), "-d", str(calibrated["id"]), "-c",
            "3d_fullres", "-f", "0", "-tr", name, "-device", "cpu", "--disable_tta", "-step_size", "0.75",
            "-npp", "0", "-nps", "0")
    ours = np.asarray(nibabel.load(calibrated["out"] / "predictions" / name / f"{case}.nii.gz").dataobj)
    theirs = np.asarray(nibabel.load(tmp_path / "o" / f"{case}.nii.gz").dataobj)
    assert np.array_equal(ours, theirs)


def test_predict_applies_the_fitted_temperature_and_shows_before_and_after(calibrated, tmp_path):
    """predict --temperature auto on the held-out test images with labels: T from analyze's fit, each replica's
    calibration before (T=1) and after, structures.csv and failure detection for predict too."""
    from nnunet_varaug import cli

    fit = json.loads((calibrated["out"] / "temperature.json").read_text())["seed"]
    raw = calibrated["raw"]
    out = tmp_path / "pred"
    args = ["predict", "-i", os.path.join(raw, "imagesTs"), "-l", os.path.join(raw, "labelsTs"), "-o", str(out),
            "-d", str(calibrated["id"]), *FLAGS[:10], "--quiet", "-npp", "0", "--disable_tta", "-step_size", "0.75",
            "--temperature", "auto", "--instances", "lesion", "--may-be-absent", "lesion"]
    assert cli.main(args) == 0
    table = pd.read_csv(out / "calibration.csv", dtype={"label": str})
    name = calibrated["names"][0]
    assert {name, f"{name} (T=1)", "ensemble"} <= set(table["model"])
    html = (out / "report.html").read_text()
    assert f"T = {fit['temperature']:.3f}" in html
    for f in ("structures.csv", "failure_detection.csv", "review_thresholds.csv", "lesion_counts.csv"):
        assert (out / f).exists(), f
    # a retrained replica no longer matches the fit: refused, nothing written
    from conftest import weights_of

    ckpt = os.path.join(os.environ["nnUNet_results"], calibrated["name"], f"{name}__nnUNetPlans__3d_fullres",
                        "fold_0", "checkpoint_final.pth")
    other = ckpt.replace(name, calibrated["names"][1])
    with weights_of(ckpt, other):
        assert cli.main(args[:5] + ["-o", str(tmp_path / "refused")] + args[7:]) == 2
    assert not (tmp_path / "refused").exists()
