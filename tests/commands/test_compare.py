"""``nnunet_varaug compare`` end to end: the tiny replicas of the shared fixture against three replicas of a
deliberately weaker trainer (one epoch of one iteration), on 12 fresh labelled synthetic cases.

The weaker trainer is a user's own trainer class in an ``nnUNet_extTrainer`` folder, as nnU-Net documents custom
trainers: the plugin builds its ``_seed<k>`` replicas like any other base. The main run goes through the console
script; the rerun and the refusals call :func:`compare_trainers` in this process (no 12 s of imports each). Dice
and volumes are checked against a computation from the prediction files on disk.
"""
from __future__ import annotations

import os
import textwrap

import nibabel
import numpy as np
import pandas as pd
import pytest

from conftest import SYNTHETIC_3D_ID, TINY, run_cli, side_by_side_env

pytestmark = pytest.mark.e2e

WEAK = "nnUNetTrainerTinyShort"
WEAK_TRAINER = f'''
    """nnUNetTrainerTiny cut to one epoch of one iteration: deliberately weaker, for compare's test."""
    import torch

    from nnunet_varaug.training.trainers.tiny import nnUNetTrainerTiny


    class {WEAK}(nnUNetTrainerTiny):
        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cuda")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = 1
            self.num_iterations_per_epoch = 1
'''
FLAGS = ["-d", str(SYNTHETIC_3D_ID), "-c", "3d_fullres", "-f", "0"]


@pytest.fixture(scope="module")
def weaker(seed_replicas, tmp_path_factory):
    """Three replicas of the weaker trainer (side by side), 12 labelled cases, and the environment that finds it."""
    from nnunet_varaug.experiments.datasets import make_synthetic_dataset

    root = tmp_path_factory.mktemp("compare")
    ext = root / "ext"
    ext.mkdir()
    (ext / "weaker_trainers.py").write_text(textwrap.dedent(WEAK_TRAINER))
    env = dict(os.environ, nnUNet_extTrainer=f"{ext}{os.pathsep}{os.environ['nnUNet_extTrainer']}")
    run_cli("nnunet_varaug", "replicas", *FLAGS, "-n", "3", "-tr", WEAK, "-device", "cpu", "--devices", "0,1",
            env=side_by_side_env(env))
    cases = make_synthetic_dataset(SYNTHETIC_3D_ID, str(root / "raw"), name="CompareCases", num_cases=12, seed=21)
    return {**seed_replicas, "env": env, "ext": str(ext), "root": root,
            "images": os.path.join(cases, "imagesTr"), "labels": os.path.join(cases, "labelsTr")}


@pytest.fixture(scope="module")
def compared(weaker):
    out = str(weaker["root"] / "out")
    proc = run_cli("nnunet_varaug", "compare", *FLAGS, "-tr", TINY, WEAK, "-n", "3", "-i", weaker["images"],
                   "-l", weaker["labels"], "--target-halfwidth", "0.05", "-device", "cpu", "--quiet", "-o", out,
                   env=weaker["env"])
    return {**weaker, "out": out, "stdout": proc.stdout}


def _dice(pred: np.ndarray, gt: np.ndarray) -> float:
    s = pred.sum() + gt.sum()
    return np.nan if s == 0 else 2.0 * np.logical_and(pred, gt).sum() / s


def test_the_stronger_trainer_wins_with_the_right_numbers(compared):
    """Dice per case and replica from the prediction files, the means and the difference recomputed; the verdict
    says the tiny trainer beats the weaker one on the organ and on the mean over structures."""
    out = compared["out"]
    scores = pd.read_csv(os.path.join(out, "scores.csv"), dtype={"label": str})
    table = pd.read_csv(os.path.join(out, "compare.csv"), dtype={"label": str})
    cases = sorted(f[: -len(".nii.gz")] for f in os.listdir(compared["labels"]))
    dice = {}
    for trainer in (TINY, WEAK):
        rows = []
        for case in cases:
            gt = np.asarray(nibabel.load(os.path.join(compared["labels"], case + ".nii.gz")).dataobj)
            row = []
            for k in range(3):
                replica = f"{trainer}_seed{k}"
                pred = np.asarray(nibabel.load(os.path.join(out, "trainers", trainer, "predictions", replica,
                                                            case + ".nii.gz")).dataobj)
                row.append(_dice(pred == 1, gt == 1))
                got = scores[(scores["case"] == case) & (scores["replica"] == replica) & (scores["label"] == "1")]
                assert got["dice"].item() == pytest.approx(row[-1])
                assert got["volume_abs_diff_mm3"].item() == pytest.approx(abs((pred == 1).sum() - (gt == 1).sum()))
            rows.append(row)
        dice[trainer] = np.array(rows)
    organ = table[(table["label"] == "1") & (table["measure"] == "dice")].iloc[0]
    assert (organ["trainer_a"], organ["trainer_b"]) == (TINY, WEAK)
    assert organ["mean_a"] == pytest.approx(dice[TINY].mean()) and organ["mean_b"] == pytest.approx(dice[WEAK].mean())
    assert organ["delta"] == pytest.approx(dice[WEAK].mean() - dice[TINY].mean())
    assert [float(v) for v in organ["replica_means_a"].split(";")] == pytest.approx(dice[TINY].mean(0))
    assert organ["verdict"] == "a_better" and organ["ci_high"] < 0
    assert table[(table["label"] == "mean") & (table["measure"] == "dice")]["verdict"].item() == "a_better"
    assert set(table["measure"]) == {"dice", "volume"} and len(table) == 2 + 1 + 2
    md = open(os.path.join(out, "compare.md")).read()
    assert f"**`{TINY}` is better than `{WEAK}` by {100 * (dice[TINY].mean() - dice[WEAK].mean()):.2f} Dice points**" in md
    assert "replica pairs" in md and "all 20 labelings" in md
    html = open(os.path.join(out, "report.html")).read()
    assert "<!-- section:compare -->" in html and "data:image/png;base64," in html
    assert sorted(os.listdir(os.path.join(out, "figures"))) == ["compare_1.png", "compare_2.png", "compare_mean.png"]
    assert f"organ (1), {WEAK} vs {TINY}: {TINY} is better than {WEAK}" in compared["stdout"]


def test_a_rerun_predicts_nothing_again(compared, monkeypatch):
    from nnunet_varaug.commands.compare import compare_trainers

    monkeypatch.setenv("nnUNet_extTrainer", compared["env"]["nnUNet_extTrainer"])
    folder = os.path.join(compared["out"], "trainers")
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs)
    assert sum(f.endswith(".nii.gz") for f in files) == 2 * 3 * 12  # 2 trainers x 3 replicas x 12 cases
    before = {f: os.stat(f).st_mtime_ns for f in files}
    records = {f: open(f).read() for f in files if f.endswith(".json")}
    rows, path = compare_trainers(SYNTHETIC_3D_ID, "3d_fullres", 0, 3, [TINY, WEAK], compared["out"],
                                  images=compared["images"], labels=compared["labels"], device="cpu", progress=False)
    changed = [os.path.relpath(f, folder) for f in files if os.stat(f).st_mtime_ns != before[f]]
    assert not changed, (changed[:5], {os.path.relpath(f, folder): (old, open(f).read())
                                       for f, old in records.items() if open(f).read() != old})
    assert rows[0].result.status == "a_better" and path == os.path.join(compared["out"], "compare.md")


def test_k2_gives_numbers_but_no_verdict(compared, monkeypatch, tmp_path):
    """With 2 replicas each (cached predictions reused) every row says K is too small, and how to train more."""
    from nnunet_varaug.commands.compare import compare_trainers

    monkeypatch.setenv("nnUNet_extTrainer", compared["env"]["nnUNet_extTrainer"])
    rows, path = compare_trainers(SYNTHETIC_3D_ID, "3d_fullres", 0, 2, [TINY, WEAK], compared["out"],
                                  images=compared["images"], labels=compared["labels"], device="cpu", progress=False)
    assert {r.result.status for r in rows} == {"too_few_replicas"}
    md = open(path).read()
    assert "**K too small to say**" in md and "is better than" not in md
    assert f"nnunet_varaug replicas -d {SYNTHETIC_3D_ID} -c 3d_fullres -f 0 -n 3 -tr {WEAK}" in md


def test_missing_replicas_name_the_replicas_commands(compared, monkeypatch, tmp_path):
    """-n 4: the fourth replica of each trainer is missing; the error gives both `replicas` commands and nothing
    is written."""
    from nnunet_varaug.commands.compare import compare_trainers
    from nnunet_varaug.utilities.errors import VarAugError

    monkeypatch.setenv("nnUNet_extTrainer", compared["env"]["nnUNet_extTrainer"])
    out = str(tmp_path / "never")
    with pytest.raises(VarAugError) as e:
        compare_trainers(SYNTHETIC_3D_ID, "3d_fullres", 0, 4, [TINY, WEAK], out, device="cpu")
    for trainer in (TINY, WEAK):
        assert f"{trainer}_seed3" in str(e.value)
        assert f"nnunet_varaug replicas -d {SYNTHETIC_3D_ID} -c 3d_fullres -f 0 -n 4 -tr {trainer}" in str(e.value)
    for bad, words in (([TINY], "at least two trainers"), ([TINY, TINY], "more than once")):
        with pytest.raises(VarAugError, match=words):
            compare_trainers(SYNTHETIC_3D_ID, "3d_fullres", 0, 3, bad, out, device="cpu")
    with pytest.raises(VarAugError, match="-l LABELS"):
        compare_trainers(SYNTHETIC_3D_ID, "3d_fullres", 0, 3, [TINY, WEAK], out, images=compared["images"])
    assert not os.path.exists(out)
