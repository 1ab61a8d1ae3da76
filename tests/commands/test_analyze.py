"""``nnunet_varaug analyze`` end to end on three trained tiny replicas, and its errors on bad input.

The main run goes through the console script (``run_cli``); error cases call the same entry point in-process
(``cli.main``) to spare the ~12 s of imports per call. Values are checked against independent computations
from the files on disk and against ``nnUNetv2_predict``.
"""
from __future__ import annotations

import os
import shutil

import nibabel
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from conftest import run_cli

pytestmark = pytest.mark.e2e

FLAGS = ["-c", "3d_fullres", "-f", "0", "-tr", "nnUNetTrainerTiny", "-device", "cpu", "--quiet"]


def _dice(a: np.ndarray, b: np.ndarray, empty: float = 1.0) -> float:
    s = a.sum() + b.sum()
    return empty if s == 0 else 2.0 * np.logical_and(a, b).sum() / s


@pytest.fixture(scope="module")
def analyzed(seed_replicas, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("analyze") / "report")
    proc = run_cli("nnunet_varaug", "analyze", "-d", str(seed_replicas["id"]), "-n", "3", *FLAGS, "-o", out)
    return {**seed_replicas, "out": out, "stdout": proc.stdout}


def _val_cases(info):
    import json

    with open(os.path.join(os.environ["nnUNet_preprocessed"], info["name"], "splits_final.json")) as f:
        return sorted(json.load(f)[0]["val"])


def test_report_files_and_values(analyzed):
    out, names = analyzed["out"], analyzed["names"]
    val = _val_cases(analyzed)
    cases = pd.read_csv(os.path.join(out, "cases.csv"), dtype={"label": str})
    pairs = pd.read_csv(os.path.join(out, "pairs.csv"), dtype={"label": str})
    summary = pd.read_csv(os.path.join(out, "summary.csv"), dtype={"label": str})
    assert sorted(cases["case"].unique()) == val and len(cases) == len(val) * 2 * 3 and len(pairs) == len(val) * 2 * 3
    assert list(summary["name"]) == ["organ", "lesion"]
    ties = 0
    for case in val:
        preds = [np.asarray(nibabel.load(os.path.join(out, "predictions", n, case + ".nii.gz")).dataobj)
                 for n in names]
        ref = nibabel.load(os.path.join(analyzed["raw"], "imagesTr", case + "_0000.nii.gz"))
        gt = np.asarray(nibabel.load(os.path.join(analyzed["raw"], "labelsTr", case + ".nii.gz")).dataobj)
        voxel = float(np.prod(ref.header.get_zooms()))
        for label in (1, 2):
            rows = cases[(cases["case"] == case) & (cases["label"] == str(label))].set_index("replica")
            for k, n in enumerate(names):
                assert rows.loc[n, "volume_mm3"] == pytest.approx((preds[k] == label).sum() * voxel)
                assert rows.loc[n, "dice_to_gt"] == pytest.approx(_dice(preds[k] == label, gt == label, np.nan),
                                                                  nan_ok=True)  # nnU-Net: NaN if both empty
            p = pairs[(pairs["case"] == case) & (pairs["label"] == str(label))]
            row = p[(p["replica_a"] == names[0]) & (p["replica_b"] == names[2])].iloc[0]
            assert row["dice"] == pytest.approx(_dice(preds[0] == label, preds[2] == label))
        # voxel maps: the input image's grid and affine, majority = the vote of the predictions
        for kind in ("entropy", "entropy_norm", "majority", "disagreement"):
            m = nibabel.load(os.path.join(out, "maps", f"{case}_{kind}.nii.gz"))
            assert m.shape == ref.shape
            np.testing.assert_allclose(m.affine, ref.affine, atol=1e-5)
            a = sitk.ReadImage(os.path.join(out, "maps", f"{case}_{kind}.nii.gz"))
            b = sitk.ReadImage(os.path.join(analyzed["raw"], "imagesTr", case + "_0000.nii.gz"))
            assert a.GetSize() == b.GetSize() and np.allclose(a.GetOrigin(), b.GetOrigin())
        majority = np.asarray(nibabel.load(os.path.join(out, "maps", f"{case}_majority.nii.gz")).dataobj)
        stack = np.stack(preds)
        counts = np.stack([(stack == v).sum(0) for v in (0, 1, 2)])
        # ties go to the highest mean probability: the stored mean, read back in the image's grid (z, y, x)
        with np.load(os.path.join(out, "predictions", "_probabilities", "seed", case + ".npz")) as f:
            prob = f["mean"].transpose(0, 3, 2, 1)  # nibabel's (x, y, z) order like the predictions here
        np.testing.assert_allclose(prob.sum(0), 1.0, atol=1e-4)  # a mean of softmaxes
        tied = counts == counts.max(0)
        np.testing.assert_array_equal(majority, np.where(tied, prob, -np.inf).argmax(0))
        ties += int((tied.sum(0) > 1).sum())
        bits = np.asarray(nibabel.load(os.path.join(out, "maps", f"{case}_entropy.nii.gz")).dataobj)
        norm = np.asarray(nibabel.load(os.path.join(out, "maps", f"{case}_entropy_norm.nii.gz")).dataobj)
        np.testing.assert_allclose(norm, bits / np.log2(3), rtol=1e-5)
    majority_csv = pd.read_csv(os.path.join(out, "majority.csv"))
    assert majority_csv.drop_duplicates("case")["tie_voxels"].sum() == ties
    html = open(os.path.join(out, "report.html")).read()
    assert "data:image/png;base64," in html and "organ" in html
    assert "organ (1): pairwise Dice mean" in analyzed["stdout"]
    assert f"report: {os.path.join(out, 'report.html')}" in analyzed["stdout"]


def test_ieee_model_is_the_reference(analyzed, tmp_path, capsys):
    """A ``<Base>_ieee`` model (here a copy of seed0's folder, so its predictions equal seed0's) is predicted
    too: its rows are in cases.csv, seed0's Dice to it is 1, and the significant digits use its volume."""
    import significantdigits as sd

    src = os.path.join(os.environ["nnUNet_results"], analyzed["name"], f"{analyzed['names'][0]}__nnUNetPlans__3d_fullres")
    dst = src.replace(analyzed["names"][0], "nnUNetTrainerTiny_ieee")
    shutil.copytree(src, dst)
    try:
        out = str(tmp_path / "ieee")
        raw = analyzed["raw"]
        assert _main("-d", str(analyzed["id"]), "-n", "2", *FLAGS, "-i", os.path.join(raw, "imagesTs"),
                     "-l", os.path.join(raw, "labelsTs"), "-o", out) == 0
    finally:
        shutil.rmtree(dst)
    cases = pd.read_csv(os.path.join(out, "cases.csv"), dtype={"label": str})
    summary = pd.read_csv(os.path.join(out, "summary.csv"), dtype={"label": str})
    ref = cases[cases["role"] == "reference"]
    assert set(ref["replica"]) == {"nnUNetTrainerTiny_ieee"} and len(ref) == 2 * 2
    seed0 = cases[cases["replica"] == analyzed["names"][0]].set_index(["case", "label"])
    np.testing.assert_allclose(ref.set_index(["case", "label"]).loc[seed0.index, "volume_mm3"], seed0["volume_mm3"])
    assert (seed0["dice_to_reference"] == 1.0).all()
    assert (summary["sig_reference"] == "nnUNetTrainerTiny_ieee").all()
    organ = cases[(cases["label"] == "1") & (cases["role"] == "replica")].pivot(
        index="replica", columns="case", values="volume_mm3")
    ieee = ref[ref["label"] == "1"].set_index("case").loc[organ.columns, "volume_mm3"].to_numpy()
    direct = np.asarray(sd.significant_digits(organ.to_numpy(), reference=ieee, axis=0, basis=2,
                                              method="General", error="Relative"), dtype=float)
    unanimous = (organ.to_numpy() == ieee).all(axis=0)  # organ: thousands of voxels, far from the cap
    assert summary.loc[summary["label"] == "1", "sig_bits_mean"].iat[0] == pytest.approx(
        np.nanmean(np.where(unanimous, np.nan, direct)), nan_ok=True)
    assert summary.loc[summary["label"] == "1", "unanimous_cases"].iat[0] == unanimous.sum()
    assert "reference model <code>nnUNetTrainerTiny_ieee</code>" in open(os.path.join(out, "report.html")).read()


def test_predictions_equal_nnunetv2_predict(analyzed, tmp_path):
    case = _val_cases(analyzed)[0]
    images = tmp_path / "in"
    images.mkdir()
    shutil.copy(os.path.join(analyzed["raw"], "imagesTr", case + "_0000.nii.gz"), images)
    run_cli("nnUNetv2_predict", "-i", str(images), "-o", str(tmp_path / "pred"), "-d", str(analyzed["id"]),
            "-c", "3d_fullres", "-f", "0", "-tr", analyzed["names"][1], "-device", "cpu", "-npp", "1", "-nps", "1")
    theirs = np.asarray(nibabel.load(str(tmp_path / "pred" / (case + ".nii.gz"))).dataobj)
    ours = np.asarray(nibabel.load(os.path.join(analyzed["out"], "predictions", analyzed["names"][1],
                                                case + ".nii.gz")).dataobj)
    np.testing.assert_array_equal(ours, theirs)


def _main(*args):
    from nnunet_varaug import cli

    return cli.main(["analyze", *args])


def test_rerun_reuses_predictions_and_keeps_added_sections(analyzed, capsys):
    from nnunet_varaug.report.variability_report import add_html_section

    out = analyzed["out"]
    pred = os.path.join(out, "predictions", analyzed["names"][0])
    stamps = {f: os.stat(os.path.join(pred, f)).st_mtime_ns for f in os.listdir(pred)}
    add_html_section(out, "downstream", "Downstream", "<p>DOWNSTREAM-BODY</p>")
    assert _main("-d", str(analyzed["id"]), "-n", "3", *FLAGS, "-o", out) == 0
    assert {f: os.stat(os.path.join(pred, f)).st_mtime_ns for f in os.listdir(pred) if f in stamps
            and f.endswith(".nii.gz")} == {f: t for f, t in stamps.items() if f.endswith(".nii.gz")}
    assert "DOWNSTREAM-BODY" in open(os.path.join(out, "report.html")).read()


def test_images_and_labels_folders(analyzed, tmp_path, capsys):
    out = str(tmp_path / "ts")
    raw = analyzed["raw"]
    assert _main("-d", str(analyzed["id"]), "-n", "2", *FLAGS, "-i", os.path.join(raw, "imagesTs"),
                 "-l", os.path.join(raw, "labelsTs"), "-o", out) == 0
    cases = pd.read_csv(os.path.join(out, "cases.csv"))
    assert sorted(cases["case"].unique()) == ["case_ts000", "case_ts001"] and cases["dice_to_gt"].notna().all()

    # a labels folder that lacks a case, and one with a label dataset.json does not define
    labels = tmp_path / "labels"
    labels.mkdir()
    shutil.copy(os.path.join(raw, "labelsTs", "case_ts000.nii.gz"), labels)
    before = open(os.path.join(out, "summary.csv")).read()
    assert _main("-d", str(analyzed["id"]), "-n", "2", *FLAGS, "-i", os.path.join(raw, "imagesTs"),
                 "-l", str(labels), "-o", out) == 2
    assert "case_ts001.nii.gz" in capsys.readouterr().err
    img = sitk.ReadImage(os.path.join(raw, "labelsTs", "case_ts001.nii.gz"))
    arr = sitk.GetArrayFromImage(img)
    arr[0, 0, 0] = 5
    bad = sitk.GetImageFromArray(arr)
    bad.CopyInformation(img)
    sitk.WriteImage(bad, str(labels / "case_ts001.nii.gz"))
    assert _main("-d", str(analyzed["id"]), "-n", "2", *FLAGS, "-i", os.path.join(raw, "imagesTs"),
                 "-l", str(labels), "-o", out) == 2
    err = capsys.readouterr().err
    assert "[5]" in err and "case_ts001.nii.gz" in err and "dataset.json" in err
    assert open(os.path.join(out, "summary.csv")).read() == before
    assert not [f for f in os.listdir(out) if f.startswith(".varaug_partial")]


def test_bad_replicas_and_k1(analyzed, tmp_path, capsys):
    out = str(tmp_path / "none")
    assert _main("-d", str(analyzed["id"]), "-n", "2", "--start", "50", *FLAGS, "-o", out) == 2
    err = capsys.readouterr().err
    assert "nnUNetTrainerTiny_seed50, nnUNetTrainerTiny_seed51" in err and "nnunet_varaug replicas" in err
    assert _main("-d", str(analyzed["id"]), "-n", "1", *FLAGS, "-o", out) == 2
    assert "undefined" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_predictions_of_different_shapes(analyzed, tmp_path, capsys):
    out = str(tmp_path / "copy")
    shutil.copytree(analyzed["out"], out)
    case = _val_cases(analyzed)[0]
    victim = os.path.join(out, "predictions", analyzed["names"][2], case + ".nii.gz")
    small = sitk.GetImageFromArray(np.zeros((4, 5, 6), np.uint8))
    sitk.WriteImage(small, victim)
    before = {f: open(os.path.join(out, f)).read() for f in ("summary.csv", "report.html")}
    assert _main("-d", str(analyzed["id"]), "-n", "3", *FLAGS, "-o", out) == 2
    err = capsys.readouterr().err
    assert "different shapes" in err and case in err and analyzed["names"][2] in err
    assert {f: open(os.path.join(out, f)).read() for f in before} == before


def test_retrained_replica_is_predicted_again(analyzed, tmp_path, capsys):
    """A replica's checkpoint that changed (seed0 now carrying seed2's weights) makes its cached predictions stale:
    analyze predicts that replica again, from the new weights; the others' predictions keep their values. (They are
    predicted again too: the cases' mean probabilities, used to break vote ties, must be rebuilt from every
    replica, so their files are rewritten with the same content.)"""
    from conftest import weights_of
    from nnunet_varaug.training.experiment import Experiment

    out = str(tmp_path / "copy")
    shutil.copytree(analyzed["out"], out)
    names = analyzed["names"]
    exp = Experiment.from_args(analyzed["id"], "3d_fullres", 0, 3, "nnUNetTrainerTiny")
    cases = _val_cases(analyzed)

    def prediction(name: str, case: str) -> np.ndarray:
        return np.asarray(nibabel.load(os.path.join(out, "predictions", name, case + ".nii.gz")).dataobj)

    assert any(not np.array_equal(prediction(names[0], c), prediction(names[2], c)) for c in cases)
    others = {(n, c): prediction(n, c) for n in names[1:] for c in cases}
    with weights_of(exp.final_checkpoint(names[0]), exp.final_checkpoint(names[2])):
        assert _main("-d", str(analyzed["id"]), "-n", "3", *FLAGS, "-o", out) == 0
    for case in cases:
        np.testing.assert_array_equal(prediction(names[0], case), prediction(names[2], case))
    for (n, c), before in others.items():
        np.testing.assert_array_equal(prediction(n, c), before)


def test_report_has_a_picture_per_case(analyzed):
    out = analyzed["out"]
    html = open(os.path.join(out, "report.html")).read()
    assert "<!-- section:pictures -->" in html
    for case in _val_cases(analyzed)[:12]:
        assert os.path.isfile(os.path.join(out, "figures", f"{case}_overlay.png")), case
        assert f'alt="{case}"' in html


def test_replicas_from_another_platform_are_warned_about(analyzed, tmp_path, capsys):
    """The shared replicas, all trained here, give no platform warning; with seed1's debug.json saying it ran on
    another CPU, analyze warns on stderr, naming seed1 and the CPU, and still writes the report."""
    import json

    out = str(tmp_path / "copy")
    shutil.copytree(analyzed["out"], out)  # cached predictions: no replica is predicted again
    assert _main("-d", str(analyzed["id"]), "-n", "3", *FLAGS, "-o", out) == 0
    assert "different platforms" not in capsys.readouterr().err
    debug = os.path.join(analyzed["results"], f"{analyzed['names'][1]}__nnUNetPlans__3d_fullres", "fold_0",
                         "debug.json")
    original = open(debug).read()
    try:
        record = json.loads(original)
        record["nnunet_varaug"]["determinism"]["platform"]["cpu"] = "Another CPU"
        with open(debug, "w") as f:
            json.dump(record, f)
        assert _main("-d", str(analyzed["id"]), "-n", "3", *FLAGS, "-o", out) == 0
    finally:
        with open(debug, "w") as f:
            f.write(original)
    err = capsys.readouterr().err
    assert "the replicas were trained on 2 different platforms" in err
    assert f"{analyzed['names'][1]}: cpu=Another CPU" in err
    assert os.path.isfile(os.path.join(out, "report.html"))
