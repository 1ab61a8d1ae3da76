"""Fidelity of the numerical replicas: pairwise Dice of 3 op-level ``_mca``, 3 instruction-level ``_mca…_instr``
and 3 seed replicas trained on the demo dataset, per label, side by side (docs/numerics.md, issue 11 item 5).

It builds the demo's synthetic dataset (``nnunet_varaug demo``'s: ``VarAugDemo``, 14 training cases of 32^3,
seed 2026) in ``-o``, plans and preprocesses 3d_fullres, trains the nine ``nnUNetTrainerTiny_*`` replicas on
fold 0 with ``nnUNetv2_train -device cpu`` (``--epochs`` x ``--iterations`` steps each: the same length for
every replica), and compares their final-validation predictions (nnU-Net's own, fold 0's validation cases):
for each group and label, the Dice of every pair of replicas on every case, and each replica's Dice to the
ground truth. Writes ``fidelity.csv`` and prints the table (markdown). Finished trainings are reused.

    OMP_NUM_THREADS=1 python benchmarks/fidelity_numerics.py -o /tmp/fidelity --epochs 1 --iterations 3
"""
from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import time

GROUPS = {"seed": ["nnUNetTrainerTiny_seed0", "nnUNetTrainerTiny_seed1", "nnUNetTrainerTiny_seed2"],
          "mca op": ["nnUNetTrainerTiny_mca0", "nnUNetTrainerTiny_mca1", "nnUNetTrainerTiny_mca2"],
          "mca instr": ["nnUNetTrainerTiny_mca0_instr", "nnUNetTrainerTiny_mca1_instr",
                        "nnUNetTrainerTiny_mca2_instr"]}
LABELS = {1: "organ", 2: "lesion"}
DATASET_ID = 990


def dice(a, b) -> float:
    inter = float((a & b).sum())
    total = float(a.sum() + b.sum())
    return 1.0 if total == 0 else 2 * inter / total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", dest="output", required=True)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--groups", nargs="+", default=list(GROUPS), choices=list(GROUPS))
    p.add_argument("--no-train", action="store_true",
                   help="train nothing: compare the replicas already trained (at least 2 per group)")
    args = p.parse_args(argv)
    out = os.path.abspath(args.output)
    from nnunet_varaug.training import registry
    from nnunet_varaug.experiments.datasets import make_synthetic_dataset

    env = dict(os.environ)
    env.update({"nnUNet_raw": os.path.join(out, "nnUNet_raw"),
                "nnUNet_preprocessed": os.path.join(out, "nnUNet_preprocessed"),
                "nnUNet_results": os.path.join(out, "nnUNet_results"), "nnUNet_compile": "f",
                "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1", "OMP_NUM_THREADS": "1",
                # the study runs two trainings at once: nnUNetv2_train gives torch one thread per core, and two such
                # processes ran 9.5x slower than one alone with OpenMP's default waiting, 1.5x with passive waiting
                # (benchmarks/bench_omp_wait.py, docs/performance.md)
                "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
                "VARAUG_TINY_EPOCHS": str(args.epochs), "VARAUG_TINY_ITERATIONS": str(args.iterations),
                "nnUNet_extTrainer": registry.ext_trainer_value(os.environ.get("nnUNet_extTrainer", ""))})
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.makedirs(env[key], exist_ok=True)
    bindir = os.path.dirname(sys.executable)
    raw = make_synthetic_dataset(DATASET_ID, env["nnUNet_raw"], name="VarAugDemo", num_cases=14,
                                 num_test_cases=0, seed=2026)
    name = os.path.basename(raw)
    if not os.path.isfile(os.path.join(env["nnUNet_preprocessed"], name, "nnUNetPlans.json")):
        subprocess.run([os.path.join(bindir, "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c",
                        "3d_fullres", "-np", "1", "-npfp", "1"], env={**env, "nnUNet_n_proc_DA": "1"}, check=True,
                       capture_output=True)
    folders, seconds = {}, {}
    for group in args.groups:
        for trainer in GROUPS[group]:
            folder = os.path.join(env["nnUNet_results"], name, f"{trainer}__nnUNetPlans__3d_fullres", "fold_0")
            if args.no_train and not os.path.isfile(os.path.join(folder, "checkpoint_final.pth")):
                continue
            folders[trainer] = folder
            if not os.path.isfile(os.path.join(folder, "checkpoint_final.pth")):
                t0 = time.time()
                subprocess.run([os.path.join(bindir, "nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "0", "-tr",
                                trainer, "-device", "cpu"], env=env, check=True, capture_output=True)
                seconds[trainer] = time.time() - t0
                print(f"trained {trainer} in {seconds[trainer]:.0f} s", flush=True)
    import numpy as np
    import SimpleITK as sitk

    def load(path: str):
        return sitk.GetArrayFromImage(sitk.ReadImage(path))

    rows = []
    gt_folder = os.path.join(env["nnUNet_preprocessed"], name, "gt_segmentations")
    for group in args.groups:
        trainers = [t for t in GROUPS[group] if t in folders]
        if len(trainers) < 2:
            print(f"{group}: fewer than 2 trained replicas, skipped", flush=True)
            continue
        cases = sorted(f for f in os.listdir(os.path.join(folders[trainers[0]], "validation")) if f.endswith(".nii.gz"))
        for label, structure in LABELS.items():
            pair, truth = [], []
            for case in cases:
                maps = [load(os.path.join(folders[t], "validation", case)) == label for t in trainers]
                gt = load(os.path.join(gt_folder, case)) == label
                pair += [dice(a, b) for a, b in itertools.combinations(maps, 2)]
                truth += [dice(m, gt) for m in maps]
            rows.append({"group": group, "label": structure, "replicas": len(trainers), "cases": len(cases),
                         "pairs": len(pair),
                         "pairwise_dice_mean": float(np.mean(pair)), "pairwise_dice_min": float(np.min(pair)),
                         "dice_to_truth_mean": float(np.mean(truth))})
    import pandas as pd

    table = pd.DataFrame(rows)
    table.to_csv(os.path.join(out, "fidelity.csv"), index=False)
    print(f"training: {args.epochs} epoch(s) x {args.iterations} iterations (batch 2, patch 32^3), fold 0")
    print("| group | replicas | label | pairwise Dice mean | pairwise Dice min | Dice to truth (mean) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['group']} | {r['replicas']} | {r['label']} | {r['pairwise_dice_mean']:.3f} | "
              f"{r['pairwise_dice_min']:.3f} | {r['dice_to_truth_mean']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
