"""``nnunet_varaug benchmark`` on a tiny Decathlon-format task, on the CPU: every stage through the real nnU-Net and
plugin commands, the Dice table against an independent computation, resuming, and the errors for bad input."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import TINY, run_cli
from nnunet_varaug.benchmark import STAGES, STATE_FILE
from nnunet_varaug.datasets import make_msd_task

DATASET_ID = 904
DATASET = f"Dataset{DATASET_ID:03d}_Hippocampus"


def bench_args(msd: str, out: str, *extra: str) -> tuple:
    return ("nnunet_varaug", "benchmark", "--msd", msd, "-n", "2", "-tr", TINY, "-device", "cpu", "-np", "1",
            "-o", out, *extra)


@pytest.fixture(scope="module")
def hippocampus(nnunet_env, tmp_path_factory):
    """Task04_Hippocampus-like fixture (10 training cases, 2 test cases) benchmarked once, converted to id 904."""
    root = tmp_path_factory.mktemp("bench")
    msd = make_msd_task(str(root / "msd"), "Task04_Hippocampus", num_cases=10, num_test=2, seed=4, macos_junk=True)
    out = str(root / "out")
    # --devices: the two replicas train side by side (one process per "device"; -device cpu ignores the GPU index)
    proc = run_cli(*bench_args(msd, out, "-d", str(DATASET_ID), "--devices", "0,1"), timeout=3600)
    with open(os.path.join(out, STATE_FILE)) as f:
        state = json.load(f)
    with open(os.path.join(out, "evaluation", "dice.json")) as f:
        dice = json.load(f)
    with open(os.path.join(out, "results.md")) as f:
        results = f.read()
    return {"msd": msd, "out": out, "root": root, "proc": proc, "state": state, "dice": dice, "results": results}


def fold0(trainer: str) -> str:
    return os.path.join(os.environ["nnUNet_results"], DATASET, f"{trainer}__nnUNetPlans__3d_fullres", "fold_0")


def read(path: str) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(path))


@pytest.mark.e2e
def test_every_stage_runs_and_is_recorded(hippocampus):
    out = hippocampus["proc"].stdout
    for i, stage in enumerate(STAGES, 1):
        assert f"[{i}/8] {stage}: running" in out and f"[{i}/8] {stage}: done" in out
        record = hippocampus["state"]["stages"][stage]
        assert record["status"] == "done" and record["attempts"] == 1 and record["seconds"] > 0
    assert hippocampus["state"]["settings"]["dataset_id"] == DATASET_ID
    assert "--devices 0,1" in hippocampus["state"]["stages"]["replicas"]["commands"][0]
    # each stage left what the next one needs, in nnU-Net's and the plugin's own places
    raw = os.path.join(os.environ["nnUNet_raw"], DATASET)
    assert sorted(os.listdir(os.path.join(raw, "imagesTr")))[0] == "hippocampus_000_0000.nii.gz"
    for trainer in (TINY, f"{TINY}_seed0", f"{TINY}_seed1", f"{TINY}_varaug"):
        assert os.path.isfile(os.path.join(fold0(trainer), "checkpoint_final.pth"))
    samples = os.path.join(os.environ["nnUNet_preprocessed"], DATASET, "varaug", "nnUNetPlans__3d_fullres__fold_0")
    assert os.path.isfile(os.path.join(samples, "manifest.json"))
    assert os.path.isfile(os.path.join(hippocampus["out"], "analysis", "report.html"))
    for stage in ("convert", "plan_preprocess", "baseline", "replicas", "samples", "varaug", "analyze"):
        assert os.path.getsize(os.path.join(hippocampus["out"], "logs", f"{stage}.log")) > 0


@pytest.mark.e2e
def test_dice_table_shows_nnunets_numbers_and_the_published_reference(hippocampus):
    dice, results = hippocampus["dice"], hippocampus["results"]
    assert dice["labels"] == {"1": "Anterior", "2": "Posterior"}
    for key, trainer in (("baseline", TINY), (f"{TINY}_seed0", f"{TINY}_seed0"), ("varaug", f"{TINY}_varaug")):
        with open(os.path.join(fold0(trainer), "validation", "summary.json")) as f:
            nnunet = json.load(f)  # written by nnU-Net's own validation at the end of training
        model = dice["models"][key]
        assert model["trainer"] == trainer
        assert model["dice"] == {k: pytest.approx(nnunet["mean"][k]["Dice"], nan_ok=True) for k in ("1", "2")}
        row = next(line for line in results.splitlines() if f"`{trainer}` |" in line)
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1:] == [f"{model['dice']['1']:.4f}", f"{model['dice']['2']:.4f}",
                             f"{model['foreground_mean']:.4f}"]
    reps = [dice["models"][f"{TINY}_seed{k}"]["foreground_mean"] for k in (0, 1)]
    assert "| replicas, mean ± sd (n=2) |" in results and f"{np.mean(reps):.4f} ± {np.std(reps, ddof=1):.4f} |" in results
    assert "| nnU-Net, published (MSD test set)¹ | 0.90 | 0.89 | 0.895 |" in results
    assert "arXiv:1809.10486" in results
    for stage in STAGES:
        assert f"| {stage} | done |" in results
    assert "## Variability of the replicas" in results and "analysis/report.html" in results


@pytest.mark.e2e
def test_majority_vote_is_the_voxelwise_mode_and_evaluated_like_nnunet(hippocampus):
    """Recomputed here with numpy from the replicas' exported validation predictions and the ground truth."""
    folder = os.path.join(hippocampus["out"], "evaluation", "majority_vote")
    cases = hippocampus["dice"]["validation_cases"]
    assert sorted(f[: -len(".nii.gz")] for f in os.listdir(folder)) == cases
    with open(os.path.join(hippocampus["out"], "evaluation", "majority_vote.json")) as f:
        per_case = {os.path.basename(c["prediction_file"])[: -len(".nii.gz")]: c["metrics"]
                    for c in json.load(f)["metric_per_case"]}
    gt_folder = os.path.join(os.environ["nnUNet_preprocessed"], DATASET, "gt_segmentations")
    for case in cases:
        maps = np.stack([read(os.path.join(fold0(f"{TINY}_seed{k}"), "validation", f"{case}.nii.gz"))
                         for k in (0, 1)])
        counts = np.stack([(maps == label).sum(0) for label in (0, 1, 2)])
        expected = np.argmax(counts, axis=0)  # first maximum: ties go to the smaller label
        vote = read(os.path.join(folder, f"{case}.nii.gz"))
        np.testing.assert_array_equal(vote, expected)
        gt = read(os.path.join(gt_folder, f"{case}.nii.gz"))
        for label in (1, 2):
            a, b = vote == label, gt == label
            denom = a.sum() + b.sum()
            nnunet = per_case[case][str(label)]["Dice"]
            if denom == 0:
                assert np.isnan(nnunet)
            else:
                assert nnunet == pytest.approx(2 * (a & b).sum() / denom)


def current(hippocampus) -> tuple:
    """The benchmark's state file and results.md as they are now (other tests may have run stages again)."""
    with open(os.path.join(hippocampus["out"], STATE_FILE)) as f:
        state = json.load(f)
    with open(os.path.join(hippocampus["out"], "results.md")) as f:
        return state, f.read()


@pytest.mark.e2e
def test_second_run_skips_every_stage(hippocampus):
    state_before, results_before = current(hippocampus)
    again = run_cli(*bench_args(hippocampus["msd"], hippocampus["out"], "-d", str(DATASET_ID)))
    assert "running" not in again.stdout
    assert again.stdout.count("complete, skipped") == len(STAGES)
    state, results = current(hippocampus)
    assert state["stages"] == state_before["stages"], "nothing ran, nothing was recounted"
    assert results == results_before


@pytest.mark.e2e
def test_a_stage_whose_output_is_gone_runs_again_alone(hippocampus):
    before = current(hippocampus)[0]["stages"]["evaluate"]
    os.remove(os.path.join(hippocampus["out"], "evaluation", "dice.json"))
    proc = run_cli(*bench_args(hippocampus["msd"], hippocampus["out"], "-d", str(DATASET_ID), "--stages", "evaluate"))
    assert "[1/1] evaluate: running" in proc.stdout and "baseline" not in proc.stdout
    record = current(hippocampus)[0]["stages"]["evaluate"]
    assert record["attempts"] == before["attempts"] + 1 and record["seconds"] > before["seconds"]
    with open(os.path.join(hippocampus["out"], "evaluation", "dice.json")) as f:
        assert json.load(f)["models"] == hippocampus["dice"]["models"]


# ---- bad input ------------------------------------------------------------------------------------------------------
def refused(*args: str) -> str:
    proc = run_cli(*args, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    return proc.stderr


@pytest.mark.e2e
def test_task_converted_under_another_id_is_named(hippocampus, tmp_path):
    err = refused(*bench_args(hippocampus["msd"], str(tmp_path / "out")))
    assert f"already converted as {DATASET}" in err and f"-d {DATASET_ID}" in err
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.nnunet
def test_dataset_id_taken_by_another_dataset(nnunet_env, tmp_path):
    other = os.path.join(os.environ["nnUNet_raw"], "Dataset906_Other")
    os.makedirs(other)
    try:
        msd = make_msd_task(str(tmp_path), "Task09_Spleen", num_cases=2, num_test=0, label_names=("spleen",),
                            shape=(8, 8, 8))
        err = refused(*bench_args(msd, str(tmp_path / "out"), "-d", "906"))
    finally:
        os.rmdir(other)
    assert "dataset id 906 is taken by Dataset906_Other" in err and "pass -d with a free id" in err


@pytest.mark.nnunet
def test_stage_before_its_inputs_names_the_stage_to_run(nnunet_env, tmp_path):
    msd = make_msd_task(str(tmp_path), "Task03_Liver", num_cases=2, num_test=0, shape=(8, 8, 8))
    err = refused(*bench_args(msd, str(tmp_path / "out"), "-d", "908", "--stages", "samples,varaug"))
    assert "stage 'samples' needs stage 'replicas' first" in err and "--stages replicas" in err
    assert not os.path.exists(os.path.join(os.environ["nnUNet_raw"], "Dataset908_Liver"))


@pytest.mark.e2e
def test_other_settings_in_the_same_output_folder_are_refused(hippocampus):
    args = list(bench_args(hippocampus["msd"], hippocampus["out"], "-d", str(DATASET_ID)))
    args[args.index("-n") + 1] = "3"
    err = refused(*args)
    assert "holds a benchmark with other settings (num_replicas: 2 -> 3)" in err


@pytest.mark.nnunet
def test_unknown_stage_and_damaged_task_folder(nnunet_env, tmp_path):
    msd = make_msd_task(str(tmp_path), "Task03_Liver", num_cases=2, num_test=0, shape=(8, 8, 8))
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
    from nnunet_varaug.benchmark import Benchmark, read_msd_task

    bench = Benchmark(read_msd_task(hippocampus["msd"]), hippocampus["out"], DATASET_ID, num_replicas=2, base=TINY,
                      device="cpu", num_processes=1, devices="0,1")
    checkpoint = os.path.join(fold0(f"{TINY}_seed0"), "checkpoint_final.pth")
    assert bench.done("samples") and bench.done("evaluate")
    with weights_of(checkpoint, os.path.join(fold0(f"{TINY}_seed1"), "checkpoint_final.pth")):
        assert not bench.done("samples") and not bench.done("evaluate")
        assert bench.done("replicas")  # still trained: only what was made from the old weights is stale
    os.utime(checkpoint)  # same bytes, new mtime
    assert bench.done("samples") and bench.done("evaluate")
