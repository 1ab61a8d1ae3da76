"""``nnUNetTrainerTiny``'s final validation (nnU-Net's, its process pools in the trainer's process) vs the same
trainer with nnU-Net's own ``perform_actual_validation`` (a spawned export pool and a spawned metrics pool).

Builds, in a temporary folder, the test suite's synthetic dataset (10 cases of 32³, fold 0 validates 2), plans
and preprocesses it, trains ``nnUNetTrainerTiny`` for one short epoch, and copies its fold folder to
``nnUNetTrainerTinyStockValidation`` (the tiny trainer with nnU-Net's ``perform_actual_validation`` put back, from
a user trainer folder on ``nnUNet_extTrainer``). Then, interleaved, ``--repeats`` times each, the command a user
runs to validate a trained model, each a fresh process:

    nnUNetv2_train 986 3d_fullres 0 -tr <trainer> --val -device cpu

and prints the median wall time of each and their ratio, and whether both wrote the same validation Dice.

    python benchmarks/bench_tiny_validation.py [--repeats 3] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

from _workspace import nnunet_folders, workspace

BIN = os.path.dirname(sys.executable)
DATASET = 986
TINY = "nnUNetTrainerTiny"
STOCK = "nnUNetTrainerTinyStockValidation"
USER_TRAINER = f'''
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunet_varaug.training.trainers.tiny import nnUNetTrainerTiny


class {STOCK}(nnUNetTrainerTiny):
    """nnUNetTrainerTiny with nnU-Net's own final validation (spawned export and metrics pools)."""
    perform_actual_validation = nnUNetTrainer.perform_actual_validation
'''


def run(cmd, env) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--keep", default=None, help="work in this folder and keep it")
    args = p.parse_args(argv)

    from nnunet_varaug.experiments.datasets import make_synthetic_dataset
    from nnunet_varaug.training.registry import ext_trainer_value

    with workspace(args.keep, "bench_tiny_validation_") as root:
        user = os.path.join(root, "user_trainers")
        os.makedirs(user, exist_ok=True)
        with open(os.path.join(user, "stock_validation.py"), "w") as f:
            f.write(USER_TRAINER)
        env = dict(os.environ, **nnunet_folders(root), nnUNet_compile="f", nnUNet_def_n_proc="1",
                   nnUNet_n_proc_DA="0", nnUNet_extTrainer=ext_trainer_value(user))
        os.environ.update(nnunet_folders(root))
        raw = make_synthetic_dataset(DATASET, env["nnUNet_raw"], name="BenchValidation", num_cases=10, seed=1)
        run([os.path.join(BIN, "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET), "-c", "3d_fullres", "-np", "1",
             "-npfp", "1"], {**env, "nnUNet_n_proc_DA": "1"})
        run([os.path.join(BIN, "nnUNetv2_train"), str(DATASET), "3d_fullres", "0", "-tr", TINY, "-device", "cpu"],
            {**env, "VARAUG_TINY_EPOCHS": "1", "VARAUG_TINY_ITERATIONS": "2"})
        results = os.path.join(env["nnUNet_results"], os.path.basename(raw))
        stock_folder = os.path.join(results, f"{STOCK}__nnUNetPlans__3d_fullres")
        shutil.rmtree(stock_folder, ignore_errors=True)
        shutil.copytree(os.path.join(results, f"{TINY}__nnUNetPlans__3d_fullres"), stock_folder)

        times = {TINY: [], STOCK: []}
        for _ in range(args.repeats):
            for trainer in (STOCK, TINY):
                times[trainer].append(run([os.path.join(BIN, "nnUNetv2_train"), str(DATASET), "3d_fullres", "0",
                                           "-tr", trainer, "--val", "-device", "cpu"], env))
        dice = {}
        for trainer in (STOCK, TINY):
            with open(os.path.join(results, f"{trainer}__nnUNetPlans__3d_fullres", "fold_0", "validation",
                                   "summary.json")) as f:
                dice[trainer] = json.load(f)["foreground_mean"]["Dice"]
        stock, tiny = statistics.median(times[STOCK]), statistics.median(times[TINY])
        print(f"nnUNetv2_train --val, 2 validation cases of 32³, median of {args.repeats} (fresh processes, "
              f"interleaved), {os.cpu_count()} CPU(s):")
        print(f"  nnU-Net's perform_actual_validation (spawned pools): {stock:7.2f} s  "
              f"{' '.join(f'{t:.2f}' for t in times[STOCK])}")
        print(f"  nnUNetTrainerTiny (pools in the trainer's process):   {tiny:7.2f} s  "
              f"{' '.join(f'{t:.2f}' for t in times[TINY])}")
        print(f"  ratio tiny / nnU-Net's: {tiny / stock:.3f}; saved per validation: {stock - tiny:.2f} s")
        print(f"  validation foreground Dice: {dice[STOCK]!r} vs {dice[TINY]!r} "
              f"({'identical' if dice[STOCK] == dice[TINY] else 'DIFFERENT'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
