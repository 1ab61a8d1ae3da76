"""``nnunet_varaug sources``: refusals before anything is written, the printed commands, and one real run (the
shared seed replicas plus one ``_order`` replica) whose table is checked against the cached predictions read
back with SimpleITK and measured with plain numpy."""
from __future__ import annotations

import csv
import os

import numpy as np
import pytest

from conftest import SYNTHETIC_3D_ID, TINY


def sources_cli(monkeypatch, *args: str) -> int:
    """``nnunet_varaug sources ...`` in this process."""
    from nnunet_varaug import cli

    return cli.main(["sources", *args])


@pytest.mark.unit
@pytest.mark.parametrize("extra, message", [
    (("-n", "3", "--sources", "order", "nondet", "-device", "cpu"), "--sources nondet needs -device cuda"),
    (("-n", "1"), "-n 1: a variance between replicas needs at least 2"),
])
def test_refused_before_anything_is_written(monkeypatch, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    code = sources_cli(monkeypatch, "-d", "101", "-c", "3d_fullres", "-f", "0", *extra, "-o", str(out))
    assert code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def flags(n: int, *sources: str) -> list:
    return ["-d", str(SYNTHETIC_3D_ID), "-c", "3d_fullres", "-f", "0", "-n", str(n), "-tr", TINY,
            "--sources", *sources, "-device", "cpu"]


@pytest.mark.e2e
def test_no_train_prints_the_missing_replicas_commands(seed_replicas, monkeypatch, tmp_path, capsys):
    out = tmp_path / "out"
    results = os.path.join(os.environ["nnUNet_results"], seed_replicas["name"])
    before = set(os.listdir(results))  # other tests of this session may have trained some of these names
    assert sources_cli(monkeypatch, *flags(3, "aug", "mca"), "--no-train", "-o", str(out)) == 0
    printed = capsys.readouterr().out
    wanted = [f"{TINY}_aug1", f"{TINY}_aug2", f"{TINY}_mca0", f"{TINY}_mca1", f"{TINY}_mca2"]
    wanted = [n for n in wanted if f"{n}__nnUNetPlans__3d_fullres" not in before or not os.path.isfile(
        os.path.join(results, f"{n}__nnUNetPlans__3d_fullres", "fold_0", "checkpoint_final.pth"))]
    lines = [line for line in printed.splitlines() if "nnUNetv2_train" in line]
    assert [line.split("-tr ")[1].split()[0] for line in lines] == wanted  # _seed0.._seed2 are trained already
    assert all(line.startswith("nnUNet_extTrainer=") for line in lines)
    assert not out.exists()
    assert set(os.listdir(results)) == before, "--no-train created a model folder"


def read_maps(folder: str, case: str) -> tuple:
    import SimpleITK as sitk

    image = sitk.ReadImage(os.path.join(folder, case + ".nii.gz"))
    return sitk.GetArrayFromImage(image), float(np.prod(image.GetSpacing()))


@pytest.mark.e2e
def test_a_run_attributes_what_the_predictions_show(seed_replicas, monkeypatch, tmp_path, capsys):
    """-n 2 --sources order: trains _order1 (the only one missing), predicts _seed0, _seed1 and _order1 on the
    fold's 2 validation cases, and writes a table whose every number follows from the predictions."""
    out = tmp_path / "out"
    assert sources_cli(monkeypatch, *flags(2, "order"), "--disable_tta", "--quiet", "--resamples", "200",
                       "-o", str(out)) == 0
    printed = capsys.readouterr().out
    assert "report:" in printed and "changing only the data order (cases and patch locations) gives" in printed
    for name in ("sources.csv", "figures/sources.png", "sources.md"):
        assert (out / name).is_file()
    assert (out / "figures" / "sources.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "sources.csv") as f:
        rows = {(r["structure"], r["randomness_source"]): r for r in csv.DictReader(f)}
    cases = sorted(f[: -len(".nii.gz")] for f in os.listdir(out / "predictions" / f"{TINY}_seed0")
                   if f.endswith(".nii.gz"))
    assert len(cases) == 2
    sets = {"seed": [f"{TINY}_seed0", f"{TINY}_seed1"], "order": [f"{TINY}_seed0", f"{TINY}_order1"]}
    variance = {}
    for source, names in sets.items():
        for label, structure in ((1, "organ"), (2, "lesion")):
            vols, dices = [], []
            for case in cases:
                (a, voxel), (b, _) = (read_maps(str(out / "predictions" / n), case) for n in names)
                va, vb = (a == label).sum() * voxel, (b == label).sum() * voxel
                vols.append(np.var([va, vb], ddof=1))
                both = (a == label).sum() + (b == label).sum()
                dices.append(1.0 if both == 0 else 2 * ((a == label) & (b == label)).sum() / both)
            variance[source, structure] = np.mean(vols)
            row = rows[structure, source]
            assert float(row["volume_variance_mm6"]) == pytest.approx(np.mean(vols), rel=1e-9, abs=1e-9)
            assert float(row["mean_pairwise_dice"]) == pytest.approx(np.mean(dices), rel=1e-9)
            assert row["replicas"] == "2" and row["cases"] == "2"
    for structure in ("organ", "lesion"):
        ratio = rows[structure, "order"]["variance_ratio_to_seed"]
        if variance["seed", structure] > 0:
            assert float(ratio) == pytest.approx(variance["order", structure] / variance["seed", structure])
        assert (structure, "sum_of_single_sources:order") in rows
    markdown = (out / "sources.md").read_text()
    assert f"`{TINY}_order1`" in markdown and "## Verdict" in markdown and "](figures/sources.png)" in markdown


@pytest.mark.nnunet
def test_a_seed0_of_another_layout_is_refused_before_training(synthetic_3d, monkeypatch, tmp_path, capsys):
    """_seed0 is replica 0 of the one-source sets: trained with the previous stream layout it differs from them in
    every source, so the command names it and stops before training or writing anything."""
    import json

    results = tmp_path / "results"
    monkeypatch.setenv("nnUNet_results", str(results))
    old = {"trainer": f"{TINY}_seed0", "base": TINY, "seed": {"seed": 0}, "determinism": {"device": "cpu"}}
    for k in (0, 1):
        fold = results / synthetic_3d["name"] / f"{TINY}_seed{k}__nnUNetPlans__3d_fullres" / "fold_0"
        fold.mkdir(parents=True)
        (fold / "checkpoint_final.pth").write_bytes(b"")
        (fold / "debug.json").write_text(json.dumps({"nnunet_varaug": {**old, "trainer": f"{TINY}_seed{k}"}}))
    out = tmp_path / "out"
    assert sources_cli(monkeypatch, *flags(2, "order"), "-o", str(out)) == 2
    err = capsys.readouterr().err
    assert f"layout 1: {TINY}_seed0" in err and f"layout 2: {TINY}_order1" in err
    assert f"Train {TINY}_seed0 again" in err
    assert not out.exists()
    assert not (results / synthetic_3d["name"] / f"{TINY}_order1__nnUNetPlans__3d_fullres").exists()
