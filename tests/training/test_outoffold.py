"""Out-of-fold variability samples on the shared benchmark (2 folds, 2 tiny replicas per fold): each case's maps
come from the fold that validated it, equal nnUNetv2_predict of that fold's replica brought into the preprocessed
grid by nnU-Net's own preprocessor, and a set that lacks a fold's replicas is refused with the commands to run."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from conftest import BENCH_DATASET, BENCH_ID, TINY, run_cli

pytestmark = pytest.mark.e2e
PLANS_CONFIG = "nnUNetPlans__3d_fullres"


def preprocessed(*parts: str) -> str:
    return os.path.join(os.environ["nnUNet_preprocessed"], BENCH_DATASET, *parts)


def oof_folder() -> str:
    return preprocessed("varaug", f"{PLANS_CONFIG}__out-of-fold")


def splits() -> list:
    with open(preprocessed("splits_final.json")) as f:
        return json.load(f)


def manifest(folder: str) -> dict:
    with open(os.path.join(folder, "manifest.json")) as f:
        return json.load(f)


def test_every_case_has_maps_from_the_fold_that_validated_it(varaug_benchmark):
    folds = splits()
    assert len(folds) == 2
    validated_by = {c: f for f, s in enumerate(folds) for c in s["val"]}
    m = manifest(oof_folder())
    assert m["source"] == "out-of-fold" and m["num_replicas"] == 2 and m["num_folds"] == 2
    assert sorted(m["cases"]) == sorted(validated_by)  # every training case of the dataset, none of the test split
    for case, entry in m["cases"].items():
        assert entry["fold"] == validated_by[case]
        assert case not in folds[entry["fold"]]["train"]  # made by replicas that never saw the case
    for fold in ("0", "1"):
        records = m["replicas_by_fold"][fold]
        assert [r["name"] for r in records] == [f"{TINY}_seed0", f"{TINY}_seed1"]
        assert all(r["checkpoint"].endswith(f"fold_{fold}/checkpoint_final.pth") for r in records)
    # the in-fold set of the benchmark's fold is the other source, made by fold 0's own replicas
    in_fold = manifest(preprocessed("varaug", f"{PLANS_CONFIG}__fold_0"))
    assert in_fold.get("source", "in-fold") == "in-fold" and in_fold["case_list"] == sorted(folds[0]["train"])


def test_out_of_fold_map_is_nnunet_predict_of_the_validating_replica(varaug_benchmark, tmp_path):
    """Independent path: nnUNetv2_predict of fold 1's replica 1 on the raw image, then nnU-Net's preprocessor maps
    that prediction into the preprocessed grid (transpose, crop, resample as for a segmentation)."""
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_varaug.training.sampleset import read_sample_array

    case = sorted(splits()[1]["val"])[0]
    raw = os.path.join(os.environ["nnUNet_raw"], BENCH_DATASET)
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(os.path.join(raw, "imagesTr", f"{case}_0000.nii.gz"), images)
    run_cli("nnUNetv2_predict", "-i", str(images), "-o", str(tmp_path / "pred"), "-d", str(BENCH_ID),
            "-c", "3d_fullres", "-f", "1", "-tr", f"{TINY}_seed1", "-device", "cpu", "-npp", "1", "-nps", "1")
    with open(preprocessed("nnUNetPlans.json")) as f:
        plans = PlansManager(json.load(f))
    with open(preprocessed("dataset.json")) as f:
        dataset_json = json.load(f)
    _, seg, _ = DefaultPreprocessor(verbose=False).run_case(
        [str(images / f"{case}_0000.nii.gz")], str(tmp_path / "pred" / f"{case}.nii.gz"), plans,
        plans.get_configuration("3d_fullres"), dataset_json)
    stored = read_sample_array(os.path.join(oof_folder(), f"{case}.b2nd"))
    assert stored.shape[1:] == seg.shape[1:]
    assert np.array_equal(stored[1], seg[0].astype(np.int8))


def test_missing_replicas_of_a_fold_are_refused_with_the_commands(varaug_benchmark, tmp_path):
    """samples refuses before writing anything; the _oof trainer refuses a set without fold 1's cases."""
    folder = os.path.join(os.environ["nnUNet_results"], BENCH_DATASET, f"{TINY}_seed1__{PLANS_CONFIG}", "fold_1")
    before = {f: os.path.getmtime(os.path.join(oof_folder(), f)) for f in os.listdir(oof_folder())}
    os.rename(folder, folder + ".hidden")
    try:
        proc = run_cli("nnunet_varaug", "samples", "-d", str(BENCH_ID), "-c", "3d_fullres", "-n", "2", "-tr", TINY,
                       "--source", "out-of-fold", "-device", "cpu", check=False)
    finally:
        os.rename(folder + ".hidden", folder)
    assert proc.returncode == 2, proc.stderr
    assert f"fold 1: {TINY}_seed1" in proc.stderr
    assert f"`nnunet_varaug replicas -d {BENCH_ID} -c 3d_fullres -f 1 -n 2 -tr {TINY}`" in proc.stderr
    assert "one call per fold" in proc.stderr
    assert {f: os.path.getmtime(os.path.join(oof_folder(), f)) for f in os.listdir(oof_folder())} == before

    # the trainer: a copy of the preprocessed dataset whose out-of-fold set lacks the cases fold 1 validates
    copy = tmp_path / "preprocessed"
    shutil.copytree(preprocessed(), copy / BENCH_DATASET)
    m = manifest(str(copy / BENCH_DATASET / "varaug" / f"{PLANS_CONFIG}__out-of-fold"))
    fold1 = [c for c, e in m["cases"].items() if e["fold"] == 1]
    for c in fold1:
        del m["cases"][c]
    m["case_list"] = sorted(m["cases"])
    with open(copy / BENCH_DATASET / "varaug" / f"{PLANS_CONFIG}__out-of-fold" / "manifest.json", "w") as f:
        json.dump(m, f)
    env = {**os.environ, "nnUNet_preprocessed": str(copy), "nnUNet_results": str(tmp_path / "results")}
    proc = run_cli("nnUNetv2_train", str(BENCH_ID), "3d_fullres", "0", "-tr", f"{TINY}_varaug_oof", "-device", "cpu",
                   env=env, check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "has no maps of" in out and "replicas of fold(s) 1" in out
    assert f"nnunet_varaug samples -d {BENCH_ID} -c 3d_fullres -n 2 -tr {TINY} --source out-of-fold" in out
    assert not os.path.isfile(tmp_path / "results" / BENCH_DATASET / f"{TINY}_varaug_oof__{PLANS_CONFIG}" / "fold_0"
                              / "checkpoint_final.pth")


def test_trainers_record_their_source(varaug_benchmark):
    import torch

    for trainer, source, folder in ((f"{TINY}_varaug", "in-fold", f"{PLANS_CONFIG}__fold_0"),
                                    (f"{TINY}_varaug_oof", "out-of-fold", f"{PLANS_CONFIG}__out-of-fold")):
        fold0 = os.path.join(os.environ["nnUNet_results"], BENCH_DATASET, f"{trainer}__{PLANS_CONFIG}", "fold_0")
        with open(os.path.join(fold0, "debug.json")) as f:
            record = json.load(f)["nnunet_varaug"]["sample_set"]
        assert record["source"] == source and record["folder"] == preprocessed("varaug", folder)
        ckpt = torch.load(os.path.join(fold0, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
        assert ckpt["nnunet_varaug"]["sample_set"]["source"] == source


def test_analyze_compares_in_fold_and_out_of_fold_maps(varaug_benchmark):
    """sources.csv against a plain numpy Dice of the stored maps of the same cases."""
    import csv

    from nnunet_varaug.training.sampleset import read_sample_array

    path = os.path.join(varaug_benchmark["out"], "analysis", "sources.csv")
    with open(path) as f:
        rows = {r["label"]: r for r in csv.DictReader(f)}
    cases = sorted(splits()[0]["train"])
    in_fold = preprocessed("varaug", f"{PLANS_CONFIG}__fold_0")
    for label in ("1", "2"):
        means = []
        for folder in (in_fold, oof_folder()):
            per_case = []
            for case in cases:
                a, b = read_sample_array(os.path.join(folder, f"{case}.b2nd")) == int(label)
                denom = a.sum() + b.sum()
                per_case.append(1.0 if denom == 0 else 2 * (a & b).sum() / denom)
            means.append(np.mean(per_case))
        assert int(rows[label]["cases"]) == len(cases)
        assert float(rows[label]["pairwise_dice_in_fold"]) == pytest.approx(means[0])
        assert float(rows[label]["pairwise_dice_out_of_fold"]) == pytest.approx(means[1])
    assert "In-fold versus out-of-fold maps" in varaug_benchmark["results"]
