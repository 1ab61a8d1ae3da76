"""report.py: tables against independent computations, NIfTI maps in the input's grid, HTML sections, atomicity."""
from __future__ import annotations

import math
import os

import nibabel
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from nnunet_varaug.report import tables, variability_report as report
from nnunet_varaug.evaluation import variability
from nnunet_varaug.training.experiment import Experiment

pytestmark = pytest.mark.unit

SPACING = (2.0, 1.5, 0.5)  # voxel volume 1.5 mm^3: a product of 1 could not tell voxels from mm^3
STRUCTURES = [variability.Structure("organ", (1,)), variability.Structure("lesion", (2,))]


def _experiment(kind: str) -> Experiment:
    return Experiment("Dataset999_Fake", "3d_fullres", 0, 3, "nnUNetTrainerTiny", kind)


def _results(seed: int, cases=("c0", "c1", "c2"), reference: bool = False):
    rng = np.random.default_rng(seed)
    out = {}
    for c in cases:
        gt = rng.integers(0, 3, (6, 7, 8), dtype=np.uint8)
        maps = np.stack([np.where(rng.random(gt.shape) < 0.2, rng.integers(0, 3, gt.shape, dtype=np.uint8), gt)
                         for _ in range(3)])
        ref = np.where(rng.random(gt.shape) < 0.1, 0, gt).astype(np.uint8) if reference else None
        out[c] = variability.analyze_case(maps, SPACING, STRUCTURES, [0, 1, 2], gt=gt, reference=ref)
        out[c].ref_map, out[c].label_maps = ref, maps
    return out


def test_tables_match_independent_computation():
    exp = _experiment("seed")
    results = {"seed": _results(0)}
    cases, pairs, majority, summary = tables.build_tables([exp], results)
    assert list(cases.columns) == ["case", "label", "replica", "role", "volume_mm3", "dice_to_gt",
                                   "dice_to_reference"]
    assert list(pairs.columns) == ["case", "label", "replica_a", "replica_b", "dice", "both_empty"]
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
    # one volume by hand: voxels of replica 1 in case c1 times 2 * 1.5 * 0.5 mm^3
    res = results["seed"]["c1"]
    row = c[(c["case"] == "c1") & (c["replica"] == exp.replica_names[1])].iloc[0]
    assert row["volume_mm3"] == pytest.approx(res.voxels[0, 1] * 1.5)
    assert organ["volume_mean_mm3"] == pytest.approx(np.mean([r.voxels[0].mean() * 1.5
                                                              for r in results["seed"].values()]))


def test_empty_structures_follow_each_convention():
    """Lesion absent from every map of case c0: pairs count as 1 in the headline mean and are left out of the
    non-empty mean; Dice to GT is NaN there and left out of the mean, as nnU-Net does."""
    exp = _experiment("seed")
    results = _results(0)
    rng = np.random.default_rng(5)
    gt = rng.integers(0, 2, (6, 7, 8), dtype=np.uint8)  # no label 2
    maps = np.stack([np.where(rng.random(gt.shape) < 0.2, 1 - gt, gt) for _ in range(3)]).astype(np.uint8)
    results["c0"] = variability.analyze_case(maps, SPACING, STRUCTURES, [0, 1, 2], gt=gt)
    cases, pairs, majority, summary = tables.build_tables([exp], {"seed": results})
    lesion = summary[summary["label"] == "2"].iloc[0]
    p = pairs[pairs["label"] == "2"]
    assert lesion["both_empty_pairs"] == 3 and p["both_empty"].sum() == 3
    assert lesion["pairwise_dice_mean"] == pytest.approx(p["dice"].mean())  # empty pairs as 1
    assert lesion["pairwise_dice_mean_nonempty"] == pytest.approx(p.loc[p["case"] != "c0", "dice"].mean())
    assert lesion["sig_cases"] == lesion["cases"] - 1  # c0 carries no significant bits: the count says so
    assert f"median over {lesion['sig_cases']} cases" in report.headlines(summary, 3)
    c = cases[cases["label"] == "2"]
    assert c.loc[c["case"] == "c0", "dice_to_gt"].isna().all() and lesion["gt_both_empty"] == 3
    assert lesion["dice_to_gt_mean"] == pytest.approx(c.loc[c["case"] != "c0", "dice_to_gt"].mean())
    m = majority[majority["label"] == "2"]
    assert lesion["majority_gt_both_empty"] == 1
    assert lesion["majority_dice_to_gt_mean"] == pytest.approx(m.loc[m["case"] != "c0", "dice_to_gt"].mean())


def test_reference_model_rows_dice_and_significant_digits_reference():
    import significantdigits as sd

    exp = _experiment("seed")
    results = _results(3, reference=True)
    cases, _, _, summary = tables.build_tables([exp], {"seed": results}, reference="nnUNetTrainerTiny_ieee")
    ref_rows = cases[cases["role"] == "reference"]
    assert set(ref_rows["replica"]) == {"nnUNetTrainerTiny_ieee"} and len(ref_rows) == 3 * 2  # once per case, label
    organ = summary[summary["label"] == "1"].iloc[0]
    assert organ["sig_reference"] == "nnUNetTrainerTiny_ieee"
    vols = np.stack([r.volumes_mm3[0] for r in results.values()], axis=1)  # (K, cases)
    ref = np.array([(r.ref_map == 1).sum() * 1.5 for r in results.values()])
    np.testing.assert_allclose(ref_rows[ref_rows["label"] == "1"]["volume_mm3"], ref)
    direct = np.asarray(sd.significant_digits(vols, reference=ref, axis=0, basis=2, method="General",
                                              error="Relative"), dtype=float)
    assert organ["sig_bits_mean"] == pytest.approx(direct.mean())
    rep = cases[(cases["role"] == "replica") & (cases["label"] == "1") & (cases["case"] == "c0")]
    res = results["c0"]
    # Dice of replica 0 to the reference, from the label maps themselves
    x, y = res.label_maps[0] == 1, res.ref_map == 1
    assert rep["dice_to_reference"].iat[0] == pytest.approx(2 * (x & y).sum() / (x.sum() + y.sum()))


def test_html_headlines_say_what_they_average_and_volumes_read_in_ml(tmp_path):
    out = str(tmp_path / "rep")
    exps, results = _fake_stage(tmp_path)
    summary = report.write_report(report.ReportStage(out), exps, results)
    html = open(os.path.join(out, "report.html")).read()
    assert "9 pairs; without" in html and "(K = 3: 3 replica pairs per case), two empty masks counted as 1" in html
    assert "the headline uses all pairs" in html
    assert "nnU-Net's convention" in html and "median over 3 cases" in html
    assert "probability_estimation_bernoulli(3, 3, 0.95)" in html and "K = 3 is odd" in html
    headline = html.split("<!-- section:overview -->")[1].split("<!-- /section:overview -->")[0]
    assert headline.count("<tr>") == 1 + len(summary) and "<li>" not in headline  # a table, one row per structure
    assert "e+0" not in html.split("<!-- section:figures -->")[0]  # no exponent notation in the tables
    csv = pd.read_csv(os.path.join(out, "summary.csv"))
    assert csv["volume_mean_mm3"].iloc[0] == pytest.approx(summary["volume_mean_mm3"].iloc[0])
    assert tables.format_volume(569_400.0) == "569.4 mL" and tables.format_volume(212.44) == "212.4 mm³"
    assert tables.format_volume(1_895.67) == "1.896 mL" and tables.format_volume(1.2e6) == "1,200 mL"



def test_maps_include_entropy_normalised_by_log2_k(tmp_path):
    res = _results(0)["c0"]
    stage = report.ReportStage(str(tmp_path / "rep"))
    stage.write_maps("c0", res, {"spacing": list(SPACING)})
    stage.commit()
    maps = tmp_path / "rep" / "maps"
    assert sorted(os.listdir(maps)) == ["c0_disagreement.nii.gz", "c0_entropy.nii.gz", "c0_entropy_norm.nii.gz",
                                        "c0_majority.nii.gz"]
    bits = sitk.GetArrayFromImage(sitk.ReadImage(str(maps / "c0_entropy.nii.gz")))
    norm = sitk.GetArrayFromImage(sitk.ReadImage(str(maps / "c0_entropy_norm.nii.gz")))
    assert bits.max() > 1.0  # 3 labels among 3 replicas: up to log2 3 bits
    np.testing.assert_allclose(norm, bits / math.log2(3), rtol=1e-6)
    assert norm.max() <= 1.0 + 1e-6


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
    assert "correlation across structures" in tables.format_summary(summary)
    text = tables.format_summary(summary)
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
