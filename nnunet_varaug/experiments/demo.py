"""``nnunet_varaug demo``: the whole pipeline on a built-in synthetic dataset, on the CPU, in minutes.

Every stage is the same command a user runs (printed before it runs), in nnU-Net folders under OUT:
synthetic dataset -> plan and preprocess -> K tiny seed replicas -> variability samples -> K seed replicas of the
``_varaug`` model -> variability report -> predict on held-out images -> downstream experiment on the replicas'
volumes -> ``compare``'s verdict, varaug against plain, on the held-out cohort. The varaug model is trained as K
seed replicas, not once: one training is one draw of its seed noise, and one number beside the plain replicas'
reads as a verdict that it is not. Rerunning reuses what is done.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from typing import List

from nnunet_varaug.utilities import names
from nnunet_varaug.utilities.errors import VarAugError

DEMO_ID = 990
BASE = "nnUNetTrainerTiny"


def demo_env(out: str, epochs: int, iterations: int) -> dict:
    from nnunet_varaug.launch.runner import plugin_env

    env = plugin_env()
    env.update({
        "nnUNet_raw": os.path.join(out, "nnUNet_raw"),
        "nnUNet_preprocessed": os.path.join(out, "nnUNet_preprocessed"),
        "nnUNet_results": os.path.join(out, "nnUNet_results"),
        "nnUNet_compile": "f", "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1",
        "VARAUG_TINY_EPOCHS": str(epochs), "VARAUG_TINY_ITERATIONS": str(iterations),
        "MPLBACKEND": "Agg",
    })
    # one BLAS/OpenMP thread per process: nnU-Net's export workers run beside the trainer, and two processes
    # spinning two OpenMP threads each on two cores are many times slower than one thread each
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def side_by_side() -> tuple:
    """``replicas`` flags and environment that train two replicas at once on a machine with two or more cores:
    ``--devices 0,1`` starts one process per "device" (``-device cpu`` ignores the index), and OpenMP's idle
    threads sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``: nnUNetv2_train gives torch one thread per
    core, and two such processes with spinning threads ran many times slower than one alone;
    benchmarks/bench_omp_wait.py). On one core: nothing."""
    if (os.cpu_count() or 1) < 2:
        return [], {}
    return ["--devices", "0,1"], {"OMP_WAIT_POLICY": "PASSIVE"}


def children_cpu_seconds() -> float:
    """CPU time (user + system) of every finished child process of this one, their children included."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def step(title: str, command: List[str], env: dict, extra_env: dict = None) -> str:
    """Run one stage's command, echoing it the way a user would type it; return its stdout. Prints the stage's
    wall time and CPU time (the CPU time does not depend on what else the machine runs)."""
    from nnunet_varaug.launch.runner import nnunet_command

    shown = " ".join(shlex.quote(c) for c in command)
    print(f"\n== {title}\n$ {shown}", flush=True)
    exe = nnunet_command(command[0])
    t0, cpu0 = time.time(), children_cpu_seconds()
    proc = subprocess.run(exe + command[1:], env={**env, **(extra_env or {})}, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stdout.write(proc.stdout[-3000:])
        sys.stderr.write(proc.stderr[-3000:])
        raise VarAugError(f"demo stage '{title}' failed (exit {proc.returncode}); its output is above")
    print(f"   done in {time.time() - t0:.0f} s (CPU {children_cpu_seconds() - cpu0:.0f} s)", flush=True)
    return proc.stdout


def run_demo(output: str, num_replicas: int = 3, epochs: int = 10, iterations: int = 25, cases: int = 14,
             cohort: int = 30) -> int:
    """Run every stage under ``output`` (reusing what is done); returns 0."""
    from nnunet_varaug.experiments.datasets import make_synthetic_dataset

    if num_replicas < 3:
        raise VarAugError("the demo needs at least 3 replicas (-n 3): replica 0 plays the downstream experiment's "
                          "reference model and leaves the pool, which needs 2 more")
    out = os.path.abspath(output)
    env = demo_env(out, epochs, iterations)
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.makedirs(env[key], exist_ok=True)
    t_start = time.time()
    print(f"nnunet_varaug demo: nnU-Net folders under {out} (nnUNet_raw, nnUNet_preprocessed, nnUNet_results)")

    raw = make_synthetic_dataset(DEMO_ID, env["nnUNet_raw"], name="VarAugDemo", num_cases=cases,
                                 num_test_cases=cohort, seed=2026)
    print(f"\n== synthetic dataset: {raw} ({cases} cases of 32^3 voxels: organ + low-contrast lesion)")
    d, c, f = str(DEMO_ID), "3d_fullres", "0"
    flags = ["-d", d, "-c", c, "-f", f, "-n", str(num_replicas), "-tr", BASE]
    _train_stages(env, raw, d, c, f, flags, num_replicas)

    report = os.path.join(out, "report")
    print(step("variability report on the validation cases (calibration and a fitted temperature)",
               ["nnunet_varaug", "analyze", *flags, "-device", "cpu", "--quiet", "--calibration", "-o", report], env))
    print(validation_table(env["nnUNet_results"], os.path.basename(raw), num_replicas))
    print("One training of either is one draw of its seed noise: the comparison at the end says whether the "
          "difference is larger than that.")

    cohort = _cohort_and_predict_stages(out, raw, flags, env)
    _downstream_stage(raw, out, cohort, report, env)
    print(compare_stage(raw, out, num_replicas, env))
    print(f"\nDemo finished in {time.time() - t_start:.0f} s (CPU {children_cpu_seconds():.0f} s). "
          f"Open the report: {os.path.join(report, 'report.html')}")
    return 0


def _train_stages(env: dict, raw: str, d: str, c: str, f: str, flags: list, num_replicas: int) -> None:
    """Plan and preprocess (once), the seed replicas, the variability samples, and the replicas of nnU-Net trained
    with them."""
    plans = os.path.join(env["nnUNet_preprocessed"], os.path.basename(raw), "nnUNetPlans.json")
    if not os.path.isfile(plans):
        step("plan and preprocess", ["nnUNetv2_plan_and_preprocess", "-d", d, "-c", c, "-np", "1", "-npfp", "1"], env,
             {"nnUNet_n_proc_DA": "1"})
    side, side_env = side_by_side()
    print(step(f"{num_replicas} seed replicas{' (two at a time)' if side else ''}",
               ["nnunet_varaug", "replicas", *flags, "-device", "cpu", *side], env, side_env))

    samples_flags = [*flags, "-device", "cpu", "--no-tta"]  # the demo skips mirroring TTA after training
    print(last_line(step("variability samples of the training cases", ["nnunet_varaug", "samples", *samples_flags],
                         env)))
    varaug = names.varaug_name(BASE)
    varaug_flags = ["-d", d, "-c", c, "-f", f, "-n", str(num_replicas), "-tr", varaug]
    print(step(f"{num_replicas} seed replicas of nnU-Net trained with variability samples (p = 0.5)"
               f"{' (two at a time)' if side else ''}",
               ["nnunet_varaug", "replicas", *varaug_flags, "-device", "cpu", *side], env, side_env))


def _cohort_and_predict_stages(out: str, raw: str, flags: list, env: dict) -> str:
    """analyze of the held-out cohort (the downstream experiment's features) and predict on 5 held-out images;
    returns the cohort's report folder."""
    cohort = os.path.join(out, "cohort")
    print(step("replica volumes of a held-out cohort (features for the downstream experiment)",
               ["nnunet_varaug", "analyze", *flags, "-device", "cpu", "--quiet", "--disable_tta",
                "-i", os.path.join(raw, "imagesTs"),
                "-l", os.path.join(raw, "labelsTs"), "-o", cohort], env).strip().splitlines()[-1])
    new = os.path.join(out, "new_images")  # predict (docs/inference.md) on 5 held-out images
    os.makedirs(new, exist_ok=True)
    for name in sorted(os.listdir(os.path.join(raw, "imagesTs")))[:5]:
        if not os.path.lexists(os.path.join(new, name)):
            os.symlink(os.path.join(raw, "imagesTs", name), os.path.join(new, name))
    print(step("consensus, uncertainty maps and review list of 5 held-out images",
               ["nnunet_varaug", "predict", *flags, "-device", "cpu", "--quiet", "--disable_tta", "-i", new, "-l",
                os.path.join(raw, "labelsTs"), "-o", os.path.join(out, "predict"), "--temperature", "auto",
                "--instances", "lesion", "--may-be-absent", "lesion"], env).strip())  # failure detection, lesions
    return cohort


def _downstream_stage(raw: str, out: str, cohort: str, report: str, env: dict) -> None:
    """The downstream experiment on synthetic targets: replica rows as extra regression samples."""
    targets = write_synthetic_targets(raw, os.path.join(out, "targets.csv"))
    print("\nThe downstream target is SYNTHETIC (lesion volume of the ground truth plus noise): this stage shows the "
          "mechanics of the paper's experiment, not a clinical result.")
    verdict = step("downstream experiment: replica rows as extra regression samples",
                   ["nnunet_varaug", "downstream", "--features", os.path.join(cohort, "cases.csv"), "--targets",
                    targets, "--test-size", "0.2", "--splits", "5", "--reference", names.replica_name(BASE, "seed", 0),
                    "-o", report],
                   env)  # no <Base>_ieee model in the demo: seed 0 is the reference, outside the replica pool
    print("\n".join(line for line in verdict.splitlines() if not line.startswith("  split")))


def compare_stage(raw: str, out: str, k: int, env: dict) -> str:
    """``compare``'s verdict, the varaug replicas against the plain ones on the held-out cohort; its output."""
    varaug = names.varaug_name(BASE)
    return step(f"is {varaug} better than {BASE}, beyond seed noise? ({k} seed replicas each, the held-out cohort)",
                ["nnunet_varaug", "compare", "-d", str(DEMO_ID), "-c", "3d_fullres", "-f", "0", "-tr", BASE, varaug,
                 "-n", str(k), "-device", "cpu", "--quiet", "--disable_tta", "-i", os.path.join(raw, "imagesTs"),
                 "-l", os.path.join(raw, "labelsTs"), "-o", os.path.join(out, "compare")], env).strip()


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


def validation_table(results: str, dataset: str, k: int) -> str:
    """nnU-Net's own validation Dice (fold_0/validation/summary.json) of each plain replica and each replica of the
    varaug model."""
    import json

    rows = []
    for base in (BASE, names.varaug_name(BASE)):
        rows += [names.replica_name(base, "seed", i) for i in range(k)]
    lines = []
    for name in rows:
        path = os.path.join(results, dataset, f"{name}__nnUNetPlans__3d_fullres", "fold_0", "validation",
                            "summary.json")
        with open(path) as fh:
            summary = json.load(fh)
        per_label = "  ".join(f"label {lab}: {m['Dice']:.4f}" for lab, m in summary["mean"].items())
        lines.append(f"  {name:<34} mean {summary['foreground_mean']['Dice']:.4f}   {per_label}")
    return ("\nnnU-Net validation Dice (fold 0), the plain replicas and the replicas trained with their samples:\n"
            + "\n".join(lines))


def write_synthetic_targets(raw: str, path: str, seed: int = 0) -> str:
    """A per-subject target for the mechanics demo: the ground-truth lesion volume (mm^3) plus Gaussian noise."""
    import numpy as np
    import SimpleITK as sitk

    from nnunet_varaug.utilities.fileio import write_text

    rng = np.random.default_rng(seed)
    rows = ["subject,target"]
    folder = os.path.join(raw, "labelsTs")
    for name in sorted(os.listdir(folder)):
        img = sitk.ReadImage(os.path.join(folder, name))
        voxel = float(np.prod(img.GetSpacing()))
        lesion = float((sitk.GetArrayViewFromImage(img) == 2).sum()) * voxel
        rows.append(f"{name[:-len('.nii.gz')]},{lesion + rng.normal(0, 0.1 * lesion + 1):.3f}")
    write_text(path, "\n".join(rows) + "\n")
    return path
