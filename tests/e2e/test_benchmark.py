"""``nnunet_varaug benchmark`` on a tiny Decathlon-format task, on the CPU: every stage through the real nnU-Net and
plugin commands (one shared run: held-out test split, 2 folds, both sample sources, --stability), the Dice tables
against an independent computation, the test split kept out of everything, seed stability, resuming, and the
errors for bad input."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import BENCH_DATASET as DATASET, BENCH_ID as DATASET_ID, TINY, bench_args, device_span, run_cli
from nnunet_varaug.experiments.benchmark.state import STAGES, STATE_FILE
from nnunet_varaug.experiments.datasets import make_msd_task

pytestmark = pytest.mark.e2e
PLANS_CONFIG = "nnUNetPlans__3d_fullres"
VARAUG = {"in-fold": f"{TINY}_varaug", "out-of-fold": f"{TINY}_varaug_oof"}


@pytest.fixture(scope="module")
def hippocampus(varaug_benchmark):
    return varaug_benchmark


def fold_folder(trainer: str, fold: int = 0, results: str = None) -> str:
    return os.path.join(results or os.environ["nnUNet_results"], DATASET, f"{trainer}__{PLANS_CONFIG}", f"fold_{fold}")


def fold0(trainer: str) -> str:
    return fold_folder(trainer)


def read(path: str) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(path))


def raw(*parts: str) -> str:
    return os.path.join(os.environ["nnUNet_raw"], DATASET, *parts)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    denom = a.sum() + b.sum()
    return float("nan") if denom == 0 else 2 * (a & b).sum() / denom


def stability_names(source: str) -> list:
    return [f"{VARAUG[source]}_seed{k}" for k in (0, 1)]


def all_models() -> list:
    return [TINY, f"{TINY}_seed0", f"{TINY}_seed1", *VARAUG.values(),
            *stability_names("in-fold"), *stability_names("out-of-fold")]


def test_every_stage_runs_and_is_recorded(hippocampus):
    out = hippocampus["proc"].stdout
    n = len(STAGES)
    for i, stage in enumerate(STAGES, 1):
        assert f"[{i}/{n}] {stage}: running" in out and f"[{i}/{n}] {stage}: done" in out
        record = hippocampus["state"]["stages"][stage]
        assert record["status"] == "done" and record["attempts"] == 1 and record["seconds"] >= 0
    settings = hippocampus["state"]["settings"]
    assert settings["dataset_id"] == DATASET_ID and settings["folds"] == 2 and settings["stability"] is True
    assert settings["sources"] == ["in-fold", "out-of-fold"] and settings["test_fraction"] == 0.2
    commands = hippocampus["state"]["stages"]["replicas"]["commands"]
    assert [c.split(" -f ")[1].split()[0] for c in commands] == ["0", "1"]  # one replicas call per fold
    assert all("--devices 0,1" in c for c in commands)
    assert any("--source out-of-fold" in c for c in hippocampus["state"]["stages"]["samples"]["commands"])
    for trainer in all_models():
        assert os.path.isfile(os.path.join(fold0(trainer), "checkpoint_final.pth")), trainer
    for trainer in (f"{TINY}_seed0", f"{TINY}_seed1"):
        assert os.path.isfile(os.path.join(fold_folder(trainer, 1), "checkpoint_final.pth"))
    assert os.path.isfile(os.path.join(hippocampus["out"], "analysis", "report.html"))
    for stage in ("convert", "plan_preprocess", "baseline", "replicas", "samples", "varaug", "stability", "analyze"):
        assert os.path.getsize(os.path.join(hippocampus["out"], "logs", f"{stage}.log")) > 0
    # --devices: the two varaug models trained side by side, one per device, each with its own log
    spans = {}
    for trainer in VARAUG.values():
        log = os.path.join(hippocampus["out"], "logs", f"varaug.{trainer}.log")
        assert f"-tr {trainer} " in open(log).read()
        device, start, end = device_span(log)
        spans[device] = (start, end)
    assert set(spans) == {"0", "1"} and spans["0"][0] <= spans["1"][1] and spans["1"][0] <= spans["0"][1]
    assert len(hippocampus["state"]["stages"]["varaug"]["commands"]) == 2


def test_test_split_never_reaches_planning_training_or_samples(hippocampus):
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    split = hippocampus["state"]["test_split"]
    test = split["cases"]
    every = [f"hippocampus_{i:03d}" for i in range(10)]
    assert len(test) == 2 and set(test) < set(every) and split["fraction"] == 0.2 and split["seed"] == 0
    train = sorted(set(every) - set(test))
    # raw: only the training cases where nnU-Net looks; the test cases beside them, in nnU-Net's naming
    assert sorted(os.listdir(raw("labelsTr"))) == [f"{c}.nii.gz" for c in train]
    assert sorted(os.listdir(raw("imagesTr"))) == [f"{c}_0000.nii.gz" for c in train]
    assert sorted(os.listdir(raw("imagesHeldOut"))) == [f"{c}_0000.nii.gz" for c in test]
    with open(raw("dataset.json")) as f:
        assert json.load(f)["numTraining"] == 8
    pre = os.path.join(os.environ["nnUNet_preprocessed"], DATASET)
    with open(os.path.join(pre, "dataset_fingerprint.json")) as f:
        assert len(json.load(f)["spacings"]) == 8  # the fingerprint saw 8 cases
    folder = os.path.join(pre, "nnUNetPlans_3d_fullres")
    assert sorted(infer_dataset_class(folder).get_identifiers(folder)) == train
    assert sorted(os.listdir(os.path.join(pre, "gt_segmentations"))) == [f"{c}.nii.gz" for c in train]
    with open(os.path.join(pre, "splits_final.json")) as f:
        splits = json.load(f)
    assert len(splits) == 2 and all(not set(test) & set(s["train"] + s["val"]) for s in splits)
    assert sorted(c for s in splits for c in s["val"]) == train
    for sub in (f"{PLANS_CONFIG}__fold_0", f"{PLANS_CONFIG}__out-of-fold"):
        with open(os.path.join(pre, "varaug", sub, "manifest.json")) as f:
            assert not set(test) & set(json.load(f)["cases"])
    for trainer in all_models():  # no model validated (so none trained) on a test case
        validated = [f[: -len(".nii.gz")] for f in os.listdir(os.path.join(fold0(trainer), "validation"))
                     if f.endswith(".nii.gz")]
        assert sorted(validated) == sorted(splits[0]["val"])


def test_test_dice_is_nnunets_and_sources_sit_side_by_side(hippocampus):
    """Each model's test Dice: nnU-Net's compute_metrics_on_folder, checked against numpy on the prediction and
    label files; results.md lists every model with both sources side by side."""
    ev, results = hippocampus["dice"], hippocampus["results"]
    assert ev["labels"] == {"1": "Anterior", "2": "Posterior"}
    test = ev["test"]
    assert test["cases"] == hippocampus["state"]["test_split"]["cases"]
    section = results.split("## Dice on the held-out test split")[1].split("\n## ")[0]
    for trainer in all_models():
        model = test["models"][trainer]
        predictions = os.path.join(hippocampus["out"], "evaluation", "test", "predictions", trainer)
        for label in ("1", "2"):
            per_case = [dice(read(os.path.join(predictions, f"{c}.nii.gz")) == int(label),
                             read(raw("labelsHeldOut", f"{c}.nii.gz")) == int(label)) for c in test["cases"]]
            assert model["dice"][label] == pytest.approx(np.nanmean(per_case), nan_ok=True)
        row = next(line for line in section.splitlines() if f"`{trainer}` |" in line)
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1:] == [f"{model['dice']['1']:.4f}", f"{model['dice']['2']:.4f}",
                             f"{model['foreground_mean']:.4f}"]
    assert f"in-fold samples `{VARAUG['in-fold']}`" in section and f"out-of-fold samples `{VARAUG['out-of-fold']}`" \
        in section
    reps = [test["models"][f"{TINY}_seed{k}"]["foreground_mean"] for k in (0, 1)]
    assert "| replicas, mean ± sd (n=2) |" in section
    assert f"{np.mean(reps):.4f} ± {np.std(reps, ddof=1):.4f} |" in section
    for stage in STAGES:
        assert f"| {stage} | done |" in results


def test_published_figures_are_labelled_and_kept_apart(hippocampus):
    results = hippocampus["results"]
    published = results.split("## nnU-Net's published figures")[1].split("\n## ")[0]
    for table in ("## Dice on the held-out test split", "## Dice on fold 0's validation cases"):
        section = results.split(table)[1].split("\n## ")[0]
        assert "published" not in section.lower() and "≈" not in section
    assert "| Anterior | ≈ 0.90 |" in published and "| Posterior | ≈ 0.89 |" in published
    assert "approximate (unverified)" in published and "phase-1 online leaderboard" in published
    assert "arXiv:1809.10486" in published and "not cross-validation" in published


def test_stability_rows_and_seed_replicas_of_the_varaug_models(hippocampus, tmp_path):
    """The varaug models' seed replicas differ bitwise from each other and are identical when trained again; the
    stability table puts them beside the plain replicas, with numbers recomputed here from the predictions."""
    ev, results = hippocampus["dice"], hippocampus["results"]
    stability = ev["test"]["stability"]
    assert list(stability) == ["replicas", *VARAUG.values()]
    section = results.split("## Stability across training seeds, on the held-out test split")[1].split("\n## ")[0]
    predictions = os.path.join(hippocampus["out"], "evaluation", "test", "predictions")
    for group, members in (("replicas", [f"{TINY}_seed0", f"{TINY}_seed1"]),
                           (VARAUG["in-fold"], stability_names("in-fold")),
                           (VARAUG["out-of-fold"], stability_names("out-of-fold"))):
        assert stability[group]["members"] == members
        for label in ("1", "2"):
            pair = []
            for c in ev["test"]["cases"]:
                a, b = (read(os.path.join(predictions, m, f"{c}.nii.gz")) == int(label) for m in members)
                pair.append(1.0 if a.sum() + b.sum() == 0 else dice(a, b))
            assert stability[group]["labels"][label]["pairwise_dice"] == pytest.approx(np.mean(pair))
        row = next(line for line in section.splitlines() if f"`{members[0]}`" in line)
        assert f"{stability[group]['labels']['1']['pairwise_dice']:.4f}" in row

    def weights(folder: str) -> dict:
        return torch.load(os.path.join(folder, "checkpoint_final.pth"), map_location="cpu",
                          weights_only=False)["network_weights"]

    w0, w1 = (weights(fold0(n)) for n in stability_names("out-of-fold"))
    assert any(not torch.equal(w0[k], w1[k]) for k in w0), "two seeds must give two models"
    results_dir = str(tmp_path / "results")
    run_cli("nnUNetv2_train", str(DATASET_ID), "3d_fullres", "0", "-tr", stability_names("out-of-fold")[0],
            "-device", "cpu", env=dict(os.environ, nnUNet_results=results_dir))
    again = weights(fold_folder(stability_names("out-of-fold")[0], results=results_dir))
    assert w0.keys() == again.keys() and all(torch.equal(w0[k], again[k]) for k in w0), "same seed, same model"


def test_majority_vote_is_the_voxelwise_mode_and_evaluated_like_nnunet(hippocampus):
    """Recomputed here with numpy from the replicas' test predictions and the held-out labels."""
    out = os.path.join(hippocampus["out"], "evaluation", "test")
    cases = hippocampus["dice"]["test"]["cases"]
    assert sorted(f[: -len(".nii.gz")] for f in os.listdir(os.path.join(out, "majority_vote"))) == cases
    with open(os.path.join(out, "majority_vote.json")) as f:
        per_case = {os.path.basename(c["prediction_file"])[: -len(".nii.gz")]: c["metrics"]
                    for c in json.load(f)["metric_per_case"]}
    for case in cases:
        maps = np.stack([read(os.path.join(out, "predictions", f"{TINY}_seed{k}", f"{case}.nii.gz")) for k in (0, 1)])
        counts = np.stack([(maps == label).sum(0) for label in (0, 1, 2)])
        expected = np.argmax(counts, axis=0)  # first maximum: ties go to the smaller label
        vote = read(os.path.join(out, "majority_vote", f"{case}.nii.gz"))
        np.testing.assert_array_equal(vote, expected)
        gt = read(raw("labelsHeldOut", f"{case}.nii.gz"))
        for label in (1, 2):
            nnunet = per_case[case][str(label)]["Dice"]
            expected_dice = dice(vote == label, gt == label)
            assert (np.isnan(nnunet) and np.isnan(expected_dice)) or nnunet == pytest.approx(expected_dice)


def test_second_run_skips_every_stage(hippocampus):
    again = run_cli(*bench_args(hippocampus["msd"], hippocampus["out"], "-d", str(DATASET_ID)))
    assert "running" not in again.stdout
    assert again.stdout.count("complete, skipped") == len(STAGES)
    with open(os.path.join(hippocampus["out"], STATE_FILE)) as f:
        state = json.load(f)
    assert state["stages"] == hippocampus["state"]["stages"], "nothing ran, nothing was recounted"
    with open(os.path.join(hippocampus["out"], "results.md")) as f:
        assert f.read() == hippocampus["results"]


def test_a_stage_whose_output_is_gone_runs_again_alone(hippocampus):
    os.remove(os.path.join(hippocampus["out"], "evaluation", "dice.json"))
    proc = run_cli(*bench_args(hippocampus["msd"], hippocampus["out"], "-d", str(DATASET_ID), "--stages", "evaluate"))
    assert "[1/1] evaluate: running" in proc.stdout and "baseline" not in proc.stdout
    with open(os.path.join(hippocampus["out"], STATE_FILE)) as f:
        record = json.load(f)["stages"]["evaluate"]
    assert record["attempts"] == 2 and record["seconds"] > hippocampus["state"]["stages"]["evaluate"]["seconds"]
    with open(os.path.join(hippocampus["out"], "evaluation", "dice.json")) as f:
        again = json.load(f)
    assert again["test"]["models"] == hippocampus["dice"]["test"]["models"]
    assert again["validation"]["models"] == hippocampus["dice"]["validation"]["models"]


# ---- bad input ------------------------------------------------------------------------------------------------------
def refused(*args: str) -> str:
    proc = run_cli(*args, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    return proc.stderr


def test_task_converted_under_another_id_is_named(hippocampus, tmp_path):
    err = refused(*bench_args(hippocampus["msd"], str(tmp_path / "out")))
    assert f"already converted as {DATASET}" in err and f"-d {DATASET_ID}" in err
    assert not os.path.exists(tmp_path / "out")


def test_dataset_id_taken_by_another_dataset(nnunet_env, tmp_path):
    other = os.path.join(os.environ["nnUNet_raw"], "Dataset906_Other")
    os.makedirs(other)
    try:
        msd = make_msd_task(str(tmp_path), "Task09_Spleen", num_cases=4, num_test=0, label_names=("spleen",),
                            shape=(8, 8, 8))
        err = refused(*bench_args(msd, str(tmp_path / "out"), "-d", "906"))
    finally:
        os.rmdir(other)
    assert "dataset id 906 is taken by Dataset906_Other" in err and "pass -d with a free id" in err


def test_stage_before_its_inputs_names_the_stage_to_run(nnunet_env, tmp_path):
    msd = make_msd_task(str(tmp_path), "Task03_Liver", num_cases=4, num_test=0, shape=(8, 8, 8))
    err = refused(*bench_args(msd, str(tmp_path / "out"), "-d", "908", "--stages", "samples,varaug"))
    assert "stage 'samples' needs stage 'replicas' first" in err and "--stages replicas" in err
    assert not os.path.exists(os.path.join(os.environ["nnUNet_raw"], "Dataset908_Liver"))


def test_other_settings_in_the_same_output_folder_are_refused(hippocampus):
    args = list(bench_args(hippocampus["msd"], hippocampus["out"], "-d", str(DATASET_ID)))
    args[args.index("-n") + 1] = "3"
    err = refused(*args)
    assert "holds a benchmark with other settings (num_replicas: 2 -> 3)" in err


def test_unknown_stage_and_damaged_task_folder(nnunet_env, tmp_path):
    msd = make_msd_task(str(tmp_path), "Task03_Liver", num_cases=4, num_test=0, shape=(8, 8, 8))
    assert "unknown stage(s) train" in refused(*bench_args(msd, str(tmp_path / "o"), "--stages", "convert,train"))
    with open(os.path.join(msd, "dataset.json")) as f:
        ds = json.load(f)
    del ds["labels"]
    with open(os.path.join(msd, "dataset.json"), "w") as f:
        json.dump(ds, f)
    assert "lacks the Decathlon key(s) labels" in refused(*bench_args(msd, str(tmp_path / "o")))


def test_stages_made_from_a_replica_that_changed_are_stale(hippocampus):
    """Staleness is judged by content (sha256), like samples and analyze: a retrained replica (seed0 carrying
    seed1's weights) makes the sample set and the evaluation stale; a checkpoint merely touched does not."""
    from conftest import weights_of
    from nnunet_varaug.experiments.benchmark import stages
    from nnunet_varaug.experiments.benchmark.state import Benchmark
    from nnunet_varaug.experiments.benchmark.task import read_msd_task

    bench = Benchmark(read_msd_task(hippocampus["msd"]), hippocampus["out"], DATASET_ID, num_replicas=2, base=TINY,
                      device="cpu", num_processes=1, devices="0,1", num_folds=2,
                      sources=["in-fold", "out-of-fold"], stability=True)
    checkpoint = os.path.join(fold0(f"{TINY}_seed0"), "checkpoint_final.pth")
    assert stages.done(bench, "samples") and stages.done(bench, "evaluate")
    with weights_of(checkpoint, os.path.join(fold0(f"{TINY}_seed1"), "checkpoint_final.pth")):
        assert not stages.done(bench, "samples") and not stages.done(bench, "evaluate")
        assert stages.done(bench, "replicas")  # still trained: only what was made from the old weights is stale
    os.utime(checkpoint)  # same bytes, new mtime
    assert stages.done(bench, "samples") and stages.done(bench, "evaluate")
