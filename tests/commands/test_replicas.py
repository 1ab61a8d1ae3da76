"""Seed replicas trained through the real nnU-Net commands: determinism, difference, recording, resuming,
and the stock nnU-Net commands (predict, ensemble, find_best_configuration) on replica folders."""
from __future__ import annotations

import json
import os
import textwrap

import pytest
import torch

from conftest import SYNTHETIC_3D_ID, TINY, run_cli, run_clis_side_by_side, side_by_side_env
from nnunet_varaug.training.registry import ext_trainer_value

pytestmark = pytest.mark.e2e


def final_weights(fold_folder: str) -> dict:
    return torch.load(os.path.join(fold_folder, "checkpoint_final.pth"), map_location="cpu",
                      weights_only=False)["network_weights"]


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def fold0(results: str, dataset: str, trainer: str) -> str:
    return os.path.join(results, dataset, f"{trainer}__nnUNetPlans__3d_fullres", "fold_0")


def elsewhere(tmp_path, trainer: str, workers: int, tag: str) -> tuple:
    """The command and environment that train ``trainer`` on fold 0 with its own nnUNet_results (returned too)."""
    results = str(tmp_path / f"results_{tag}")
    env = dict(os.environ, nnUNet_results=results, nnUNet_n_proc_DA=str(workers))
    return ("nnUNetv2_train", str(SYNTHETIC_3D_ID), "3d_fullres", "0", "-tr", trainer, "-device", "cpu"), env, results


def test_seed_replicas_are_bitwise_reproducible_and_differ_across_seeds(seed_replicas, tmp_path):
    """Seeds differ; the same seed trained again elsewhere gives the same weights bit for bit: with nnU-Net's
    single-threaded augmenter (nnUNet_n_proc_DA=0) against the shared replica, and with 2 augmentation workers
    twice. The three trainings run at once, beside each other (and the shared replicas two at a time), so the
    weights must not depend on the machine's load either."""
    ds = seed_replicas["name"]
    w0 = final_weights(fold0(os.environ["nnUNet_results"], ds, f"{TINY}_seed0"))
    w1 = final_weights(fold0(os.environ["nnUNet_results"], ds, f"{TINY}_seed1"))
    assert not same_weights(w0, w1), "different seeds must give different weights"

    runs = [elsewhere(tmp_path, f"{TINY}_seed0", 0, "again"),
            elsewhere(tmp_path, f"{TINY}_seed2", 2, "mt_a"), elsewhere(tmp_path, f"{TINY}_seed2", 2, "mt_b")]
    # about 40 s together here; the limit catches a hung worker (forked from torch's thread pool, one hung for
    # CI's whole 2400 s before SeededWorkerLoader ran torch single-threaded) well before CI's own
    run_clis_side_by_side(*(command for command, _, _ in runs), envs=[env for _, env, _ in runs], timeout=600)
    again, a, b = (results for _, _, results in runs)
    assert same_weights(w0, final_weights(fold0(again, ds, f"{TINY}_seed0")))
    wa, wb = final_weights(fold0(a, ds, f"{TINY}_seed2")), final_weights(fold0(b, ds, f"{TINY}_seed2"))
    assert same_weights(wa, wb), "2 data-augmentation workers must not break reproducibility"


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))


def test_seed_is_recorded_in_debug_json_and_checkpoint(seed_replicas):
    folder = fold0(os.environ["nnUNet_results"], seed_replicas["name"], f"{TINY}_seed1")
    with open(os.path.join(folder, "debug.json")) as f:
        debug = json.load(f)
    ckpt = torch.load(os.path.join(folder, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    expected = {"trainer": f"{TINY}_seed1", "base": TINY, "seed": {"seed": 1}}
    for record in (debug["nnunet_varaug"], ckpt["nnunet_varaug"]):
        determinism = record.pop("determinism")
        # every stream from K = 1, drawn the way this version draws them (tests/training/test_streams.py)
        assert record.pop("streams") == {"layout": 2, "init": 1, "order": 1, "aug": 1, "train": 1}
        assert record == expected
        # what a GPU run relies on, arranged (and recorded) on the CPU too; nnunet_env sets nnUNet_compile=f
        assert determinism["deterministic_algorithms"] and determinism["warn_only"]
        assert determinism["cudnn_deterministic"] and not determinism["cudnn_benchmark"]
        assert determinism["CUBLAS_WORKSPACE_CONFIG"] in (":4096:8", ":16:8") and determinism["compile"] is False
        assert determinism["device"] == "cpu" and determinism["nondeterministic_ops"] == []
        # the machine, read after nnUNetv2_train -device cpu set torch's threads (the tiny trainer keeps to the
        # OMP_NUM_THREADS=1 of nnunet_env)
        assert determinism["platform"]["torch"] == torch.__version__
        assert determinism["platform"]["torch_threads"] == int(os.environ["OMP_NUM_THREADS"]) == 1
        assert determinism["platform"]["cpu"] == cpu_model()
    assert ckpt["trainer_name"] == f"{TINY}_seed1"


def test_replicas_status_table(seed_replicas):
    out = seed_replicas["replicas_stdout"]
    for name in seed_replicas["names"]:
        line = next(line for line in out.splitlines() if line.startswith(name))
        state, epochs, dice = line.split()[1], line.split()[-2], line.split()[-1]
        assert state == "trained" and epochs == "2"
        assert 0.0 <= float(dice) <= 1.0
    # a second call trains nothing and says so
    again = run_cli("nnunet_varaug", "replicas", "-d", str(SYNTHETIC_3D_ID), "-c", "3d_fullres", "-f", "0", "-n", "3",
                    "-tr", TINY, "-device", "cpu")
    assert again.stdout.count("finished (skipped)") == 3


def test_stock_nnunet_commands_accept_replica_folders(seed_replicas, tmp_path):
    """predict (seed0) and predict_from_modelfolder (seed1) -> ensemble over their probabilities ->
    find_best_configuration."""
    images = os.path.join(seed_replicas["raw"], "imagesTs")
    cases = ["case_ts000.nii.gz", "case_ts001.nii.gz"]
    by_name, from_folder = str(tmp_path / "pred0"), str(tmp_path / "from_folder")
    model = os.path.dirname(fold0(os.environ["nnUNet_results"], seed_replicas["name"], f"{TINY}_seed1"))
    run_clis_side_by_side(  # the two predictions are independent: side by side
        ("nnUNetv2_predict", "-i", images, "-o", by_name, "-d", str(SYNTHETIC_3D_ID), "-c", "3d_fullres", "-f", "0",
         "-tr", f"{TINY}_seed0", "-device", "cpu", "--save_probabilities", "-npp", "1", "-nps", "1"),
        ("nnUNetv2_predict_from_modelfolder", "-i", images, "-o", from_folder, "-m", model, "-f", "0",
         "-device", "cpu", "--save_probabilities", "-npp", "1", "-nps", "1"))
    for out in (by_name, from_folder):
        assert sorted(f for f in os.listdir(out) if f.endswith(".nii.gz")) == cases
    ensemble = str(tmp_path / "ensemble")
    run_cli("nnUNetv2_ensemble", "-i", by_name, from_folder, "-o", ensemble, "-np", "1")
    assert sorted(f for f in os.listdir(ensemble) if f.endswith(".nii.gz")) == cases

    best = run_cli("nnUNetv2_find_best_configuration", str(SYNTHETIC_3D_ID), "-c", "3d_fullres",
                   "-tr", f"{TINY}_seed0", "-f", "0", "-np", "1")
    inference = os.path.join(os.environ["nnUNet_results"], seed_replicas["name"], "inference_instructions.txt")
    assert os.path.isfile(inference) and f"{TINY}_seed0" in open(inference).read(), best.stdout


INTERRUPTING_TRAINER = textwrap.dedent("""
    import os
    from nnunet_varaug.training.trainers.tiny import nnUNetTrainerTiny

    class InterruptedTiny(nnUNetTrainerTiny):
        '''Dies right after the checkpoint of epoch 0 when its replica seed is $INTERRUPT_SEED.'''
        def on_epoch_end(self):
            super().on_epoch_end()
            if str(getattr(self, "replica_seed", "")) == os.environ.get("INTERRUPT_SEED"):
                os._exit(3)
""")


RESUMED = "InterruptedTiny_seed0"  # interrupted after epoch 0, then resumed


@pytest.fixture(scope="module")
def interrupted_replicas(synthetic_3d, tmp_path_factory):
    """``replicas -n 2 -tr InterruptedTiny --devices 0,1``: seed0 dies after epoch 0, seed1 beside it finishes;
    then the same command without --devices, which resumes seed0. nnU-Net's single-process augmenter (nnunet_env's
    nnUNet_n_proc_DA=0): worker processes beside the trainers make a 2-core machine many times slower
    (docs/performance.md); the seeded workers are tested on fresh runs
    (test_seed_replicas_are_bitwise_reproducible_and_differ_across_seeds)."""
    user = tmp_path_factory.mktemp("user_trainers")
    (user / "interrupted_tiny.py").write_text(INTERRUPTING_TRAINER)
    env = dict(os.environ, nnUNet_extTrainer=ext_trainer_value(str(user)))
    args = ("nnunet_varaug", "replicas", "-d", str(SYNTHETIC_3D_ID), "-c", "3d_fullres", "-f", "0", "-n", "2",
            "-tr", "InterruptedTiny", "-device", "cpu")
    folder = fold0(os.environ["nnUNet_results"], synthetic_3d["name"], RESUMED)
    # the two replicas side by side (one per "device"): seed0 dies after epoch 0 while seed1 goes on
    first = run_cli(*args, "--devices", "0,1", env=side_by_side_env(dict(env, INTERRUPT_SEED="0")), check=False)
    after_first = {f for f in ("checkpoint_latest.pth", "checkpoint_final.pth")
                   if os.path.isfile(os.path.join(folder, f))}
    second = run_cli(*args, env=env, check=False)
    return {"first": first, "second": second, "after_first": after_first, "folder": folder, "env": env,
            "dataset": synthetic_3d["name"]}


def status_lines(stdout: str) -> dict:
    return {line.split()[0]: line for line in stdout.splitlines() if line.startswith("InterruptedTiny_")}


def test_replicas_keep_going_resume_interrupted_and_skip_finished(interrupted_replicas):
    first, second = interrupted_replicas["first"], interrupted_replicas["second"]
    assert first.returncode == 1, first.stdout + first.stderr
    lines = status_lines(first.stdout)
    assert "FAILED" in lines[RESUMED] and lines[RESUMED].split()[-2] == "1"
    assert " trained " in lines["InterruptedTiny_seed1"], "one failing replica must not stop the others"
    assert interrupted_replicas["after_first"] == {"checkpoint_latest.pth"}

    assert second.returncode == 0, second.stdout + second.stderr
    lines = status_lines(second.stdout)
    assert "resumed, finished" in lines[RESUMED] and lines[RESUMED].split()[-2] == "2"
    assert "finished (skipped)" in lines["InterruptedTiny_seed1"]
    # the resumed run continued at epoch 1 instead of starting over
    folder = interrupted_replicas["folder"]
    logs = sorted(f for f in os.listdir(folder) if f.startswith("training_log_"))
    newest = open(os.path.join(folder, logs[-1])).read()
    assert "Epoch 1" in newest and "Epoch 0\n" not in newest


def test_an_interrupted_then_resumed_replica_is_reproducible(interrupted_replicas, tmp_path):
    """The same replica interrupted after epoch 0 and resumed with --c, once more in another nnUNet_results:
    bitwise the same final weights as the fixture's. (That they also equal an uninterrupted run's, epochs being
    seeded from (replica, epoch) alone, is tested in tests/training/test_preemption.py.)"""
    assert interrupted_replicas["second"].returncode == 0, interrupted_replicas["second"].stdout
    env = dict(interrupted_replicas["env"], nnUNet_results=str(tmp_path / "results"), INTERRUPT_SEED="0")
    train = ("nnUNetv2_train", str(SYNTHETIC_3D_ID), "3d_fullres", "0", "-tr", RESUMED, "-p", "nnUNetPlans",
             "-device", "cpu")
    killed = run_cli(*train, env=env, check=False)
    assert killed.returncode == 3, killed.stdout[-2000:] + killed.stderr[-2000:]
    del env["INTERRUPT_SEED"]
    run_cli(*train, "--c", env=env)
    again = fold0(env["nnUNet_results"], interrupted_replicas["dataset"], RESUMED)
    assert same_weights(final_weights(interrupted_replicas["folder"]), final_weights(again)), \
        "an interrupted then resumed replica must be reproducible"
