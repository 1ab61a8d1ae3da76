"""report.py: tables against independent computations, NIfTI maps in the input's grid, HTML sections, atomicity."""
from __future__ import annotations

import math
import os

import nibabel
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from nnunet_varaug import report, variability
from nnunet_varaug.experiment import Experiment

STRUCTURES = [variability.Structure("organ", (1,)), variability.Structure("lesion", (2,))]


def _experiment(kind: str) -> Experiment:
    return Experiment("Dataset999_Fake", "3d_fullres", 0, 3, "nnUNetTrainerTiny", kind)


def _results(seed: int, cases=("c0", "c1", "c2")):
    rng = np.random.default_rng(seed)
    out = {}
    for c in cases:
        gt = rng.integers(0, 3, (6, 7, 8), dtype=np.uint8)
        maps = np.stack([np.where(rng.random(gt.shape) < 0.2, rng.integers(0, 3, gt.shape, dtype=np.uint8), gt)
                         for _ in range(3)])
        out[c] = variability.analyze_case(maps, (2.0, 1.0, 0.5), STRUCTURES, [0, 1, 2], gt=gt)
    return out


def test_tables_match_independent_computation():
    exp = _experiment("seed")
    results = {"seed": _results(0)}
    cases, pairs, majority, summary = report.build_tables([exp], results)
    assert list(cases.columns) == ["case", "label", "replica", "volume_mm3", "dice_to_gt"]
    assert list(pairs.columns) == ["case", "label", "replica_a", "replica_b", "dice"]
    assert len(cases) == 3 * 2 * 3 and len(pairs) == 3 * 2 * 3 and len(majority) == 3 * 2
    organ = summary[summary["label"] == "1"].iloc[0]
    p = pairs[pairs["label"] == "1"]["dice"]
    assert organ["pairwise_dice_mean"] == pytest.approx(p.mean()) and organ["pairwise_dice_min"] == p.min()
    c = cases[cases["label"] == "1"]
    per_case = c.groupby("case")["volume_mm3"]
    assert organ["volume_mean_mm3"] == pytest.approx(per_case.mean().mean())
    assert organ["volume_std_mm3"] == pytest.approx(per_case.std(ddof=1).mean())
    assert organ["volume_cv"] == pytest.approx((per_case.std(ddof=1) / per_case.mean()).mean())
    assert organ["dice_to_gt_mean"] == pytest.approx(c["dice_to_gt"].mean())
    # one volume by hand: voxels of replica 1 in case c1 times 2 * 1 * 0.5 mm^3
    res = results["seed"]["c1"]
    row = c[(c["case"] == "c1") & (c["replica"] == exp.replica_names[1])].iloc[0]
    assert row["volume_mm3"] == pytest.approx(res.voxels[0, 1] * 1.0)


def _fake_stage(tmp_path, kinds=("seed",)):
    exps = [_experiment(k) for k in kinds]
    results = {k: _results(i) for i, k in enumerate(kinds)}
    return exps, results


def test_write_report_files_html_and_two_kind_correlation(tmp_path):
    out = str(tmp_path / "rep")
    exps, results = _fake_stage(tmp_path, ("seed", "mca"))
    stage = report.ReportStage(out)
    summary = report.write_report(stage, exps, results)
    for f in ("cases.csv", "pairs.csv", "summary.csv", "majority.csv", "comparison.csv", "report.html",
              "figures/pairwise_dice.png", "figures/volume_cv.png", "figures/dice_to_gt.png", "figures/kinds.png"):
        assert os.path.isfile(os.path.join(out, f)), f
    assert not [f for f in os.listdir(out) if f.startswith(".varaug_partial")]
    comp = pd.read_csv(os.path.join(out, "comparison.csv"))
    expected = np.corrcoef(comp["pairwise_dice_mean_seed"], comp["pairwise_dice_mean_mca"])[0, 1]
    assert summary.attrs["pearson_r"] == pytest.approx(expected)
    html = open(os.path.join(out, "report.html")).read()
    assert html.count("data:image/png;base64,") == 4 and "<img" in html and 'src="figures' not in html
    assert "correlation across structures" in report.format_summary(summary)
    text = report.format_summary(summary)
    assert "organ (1) [seed]" in text and "lesion (2) [mca]" in text


def test_add_html_section_inserts_replaces_and_survives_a_rerun(tmp_path):
    out = str(tmp_path / "rep")
    exps, results = _fake_stage(tmp_path)
    report.write_report(report.ReportStage(out), exps, results)
    report.add_html_section(out, "downstream", "Downstream", "<p>FIRST-BODY</p>")
    report.add_html_section(out, "downstream", "Downstream", "<p>SECOND-BODY</p>")
    html = open(os.path.join(out, "report.html")).read()
    assert "SECOND-BODY" in html and "FIRST-BODY" not in html and html.count("<!-- section:downstream -->") == 1
    assert html.index("section:downstream") > html.index("section:summary")
    assert html.rstrip().endswith("</html>")
    report.write_report(report.ReportStage(out), exps, results)  # analyze again: keeps the foreign section
    assert "<p>SECOND-BODY</p>" in open(os.path.join(out, "report.html")).read()
    with pytest.raises(ValueError):
        report.add_html_section(out, "bad id", "x", "")
    with pytest.raises(FileNotFoundError, match="analyze"):
        report.add_html_section(str(tmp_path / "none"), "x", "x", "")


def test_failed_report_leaves_previous_one_untouched(tmp_path):
    out = str(tmp_path / "rep")
    exps, results = _fake_stage(tmp_path)
    report.write_report(report.ReportStage(out), exps, results)
    before = {f: open(os.path.join(out, f), "rb").read() for f in ("summary.csv", "report.html")}
    stage = report.ReportStage(out)
    with open(stage.path("summary.csv"), "w") as f:
        f.write("half")
    stage.abort()
    assert {f: open(os.path.join(out, f), "rb").read() for f in before} == before
    assert sorted(os.listdir(out)) == ["cases.csv", "figures", "majority.csv", "maps", "pairs.csv", "report.html",
                                       "summary.csv"]


def _oblique_image(path: str) -> None:
    img = sitk.GetImageFromArray(np.random.default_rng(0).random((7, 9, 11)).astype(np.float32))
    img.SetSpacing((0.7, 1.3, 2.9))
    img.SetOrigin((10.0, -4.0, 3.5))
    c, s = math.cos(0.3), math.sin(0.3)
    img.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(img, path)


@pytest.mark.parametrize("io", ["SimpleITKIO", "SimpleITKIOWithReorient", "NibabelIO", "NibabelIOWithReorient"])
def test_maps_have_the_input_images_grid_and_affine(tmp_path, io):
    from nnunetv2.imageio import nibabel_reader_writer, simpleitk_reader_writer

    rw = getattr(simpleitk_reader_writer, io, None) or getattr(nibabel_reader_writer, io)
    src = str(tmp_path / "case_0000.nii.gz")
    _oblique_image(src)
    data, props = rw().read_images([src])
    entropy = np.random.default_rng(1).random(data.shape[1:]).astype(np.float32)
    out = str(tmp_path / "case_entropy.nii.gz")
    report.write_map(entropy, out, props)
    ref, new = nibabel.load(src), nibabel.load(out)
    assert new.shape == ref.shape
    np.testing.assert_allclose(new.affine, ref.affine, atol=1e-5)
    a, b = sitk.ReadImage(src), sitk.ReadImage(out)
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)
    # values are not truncated to integers and land where the reader put them
    back, _ = rw().read_images([out])
    np.testing.assert_allclose(back[0], entropy, atol=1e-6)
