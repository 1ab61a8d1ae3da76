"""``nnunet_varaug predict`` with K replicas vs K separate ``nnUNetv2_predict`` runs: time and peak memory.

Builds, in a temporary folder, a synthetic dataset (``--shape`` voxels per case, ``--cases`` test images,
``--classes`` output classes: the synthetic organ and lesion plus unused labels, so that the networks have that many
output channels), plans and preprocesses it, trains ONE ``nnUNetTrainerTiny`` replica for a few iterations and
clones it into K - 1 more
replicas whose weights are perturbed by Gaussian noise (timing and memory do not depend on the weights' values;
training K real replicas would only cost minutes of CPU). Every replica's checkpoint gets nnU-Net's default
test-time mirroring for 3D, axes (0, 1, 2) (8 network passes per patch, what a model trained with nnUNetTrainer
records); nnUNetTrainerTiny's own is one axis. Then, side by side in one run:

* K runs of ``nnUNetv2_predict -tr <replica> --save_probabilities -npp 0 -nps 0`` (sequential: one process, like
  ``predict -npp 0 -nps 0``; ``--save_probabilities`` because that is what an ensemble of them needs) on all cases,
  each a fresh process as a user would run them, plus the ``nnUNetv2_ensemble`` of their outputs, vs one
  ``nnunet_varaug predict -n K -npp 0 -nps 0`` on the same cases (consensus and uncertainty maps);
* the peak resident memory (``ru_maxrss`` of the process) of one ``nnUNetv2_predict`` vs that ``predict``.

The issue's size is ``--shape 256 256 160 --classes 8`` (the defaults); on a small shared machine run a smaller
shape and say so. The machine's CPU and load average are printed with the figures.

    OMP_NUM_THREADS=1 python benchmarks/bench_predict.py [--k 10] [--cases 2] [--shape 256 256 160] [--classes 8]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

BIN = os.path.dirname(sys.executable)
DATASET = 987
TINY = "nnUNetTrainerTiny"


def measured(cmd, env) -> tuple:
    """(seconds, peak RSS in MiB) of ``cmd`` run in a fresh helper process (so ru_maxrss is this command's)."""
    helper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, "
              "stderr=subprocess.PIPE, text=True); sys.stderr.write(r.stderr[-3000:] if r.returncode else ''); "
              "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", helper, *cmd], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return seconds, int(proc.stdout.strip().splitlines()[-1]) / 1024


def setup(root: str, k: int, cases: int, shape, env: dict, classes: int = 3) -> str:
    import json

    import torch

    from nnunet_varaug.experiments.datasets import make_synthetic_dataset

    raw = make_synthetic_dataset(DATASET, env["nnUNet_raw"], name="BenchPredict", num_cases=5, shape=shape,
                                 num_test_cases=cases, seed=3)
    with open(os.path.join(raw, "dataset.json")) as f:
        dataset_json = json.load(f)
    for c in range(3, classes):  # labels no case holds: the networks get `classes` output channels
        dataset_json["labels"][f"unused{c}"] = c
    with open(os.path.join(raw, "dataset.json"), "w") as f:
        json.dump(dataset_json, f, indent=2)
    subprocess.run([os.path.join(BIN, "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET), "-c", "3d_fullres",
                    "-np", "1", "-npfp", "1"], env={**env, "nnUNet_n_proc_DA": "1"}, check=True,
                   capture_output=True)
    first = f"{TINY}_seed0"
    subprocess.run([os.path.join(BIN, "nnUNetv2_train"), str(DATASET), "3d_fullres", "0", "-tr", first, "-device",
                    "cpu"], env={**env, "VARAUG_TINY_EPOCHS": "1", "VARAUG_TINY_ITERATIONS": "2"}, check=True,
                   capture_output=True)
    results = os.path.join(env["nnUNet_results"], os.path.basename(raw))
    src = os.path.join(results, f"{first}__nnUNetPlans__3d_fullres")
    ckpt = torch.load(os.path.join(src, "fold_0", "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    ckpt["inference_allowed_mirroring_axes"] = (0, 1, 2)  # nnUNetTrainer's, not the tiny trainer's single axis
    torch.save(ckpt, os.path.join(src, "fold_0", "checkpoint_final.pth"))
    gen = torch.Generator().manual_seed(0)
    for i in range(1, k):
        name = f"{TINY}_seed{i}"
        dst = os.path.join(results, f"{name}__nnUNetPlans__3d_fullres")
        os.makedirs(os.path.join(dst, "fold_0"), exist_ok=True)
        for f in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
            if os.path.isfile(os.path.join(src, f)):
                shutil.copy(os.path.join(src, f), dst)
        clone = dict(ckpt, trainer_name=name)
        clone["network_weights"] = {n: (w + 0.05 * w.std(unbiased=False) * torch.randn(w.shape, generator=gen)
                                        if w.is_floating_point() and w.numel() > 1 else w.clone())
                                    for n, w in ckpt["network_weights"].items()}
        torch.save(clone, os.path.join(dst, "fold_0", "checkpoint_final.pth"))
    return raw


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--cases", type=int, default=2)
    ap.add_argument("--shape", type=int, nargs=3, default=[256, 256, 160])
    ap.add_argument("--classes", type=int, default=8, help="output classes, background included (at least 3)")
    ap.add_argument("--keep", default=None, help="work in this folder and keep it (default: a temporary one)")
    args = ap.parse_args()
    root = os.path.abspath(args.keep) if args.keep else tempfile.mkdtemp(prefix="bench_predict_")
    from nnunet_varaug.training.registry import ext_trainer_value

    env = {**os.environ, "nnUNet_raw": os.path.join(root, "raw"), "nnUNet_preprocessed": os.path.join(root, "pre"),
           "nnUNet_results": os.path.join(root, "results"), "nnUNet_compile": "f", "nnUNet_n_proc_DA": "0",
           "nnUNet_def_n_proc": "1", "nnUNet_extTrainer": ext_trainer_value(os.environ.get("nnUNet_extTrainer", ""))}
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.makedirs(env[key], exist_ok=True)
    try:
        t = time.perf_counter()
        raw = setup(root, args.k, args.cases, args.shape, env, args.classes)
        print(f"setup (dataset, plan, 1 tiny training, {args.k - 1} clones): {time.perf_counter() - t:.0f} s")
        images = os.path.join(raw, "imagesTs")
        single = []
        for i in range(args.k):
            out = os.path.join(root, "single", str(i))
            single.append(measured([os.path.join(BIN, "nnUNetv2_predict"), "-i", images, "-o", out, "-d",
                                    str(DATASET), "-c", "3d_fullres", "-f", "0", "-tr", f"{TINY}_seed{i}",
                                    "--save_probabilities", "-device", "cpu", "-npp", "0", "-nps", "0"], env))
        merge = measured([os.path.join(BIN, "nnUNetv2_ensemble"), "-i",
                          *[os.path.join(root, "single", str(i)) for i in range(args.k)], "-o",
                          os.path.join(root, "single_ensemble"), "-np", "1"], env)
        ours = measured([os.path.join(BIN, "nnunet_varaug"), "predict", "-i", images, "-o",
                         os.path.join(root, "ensemble"), "-d", str(DATASET), "-c", "3d_fullres", "-f", "0", "-n",
                         str(args.k), "-tr", TINY, "-device", "cpu", "--quiet", "-npp", "0", "-nps", "0"], env)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    total = sum(s for s, _ in single) + merge[0]
    peak_single = max(m for _, m in single)
    voxels = int(args.shape[0]) * int(args.shape[1]) * int(args.shape[2])
    print(f"K = {args.k} replicas, {args.cases} cases of {'x'.join(map(str, args.shape))} voxels, {args.classes} "
          f"classes (C x voxels x 4 bytes = {args.classes * voxels * 4 / 2 ** 20:.0f} MiB), CPU "
          f"({cpu_model()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end), torch threads "
          f"as nnUNetv2_predict sets them")
    print(f"time:   {args.k} x nnUNetv2_predict --save_probabilities + nnUNetv2_ensemble {total:.1f} s (each predict "
          f"{min(s for s, _ in single):.1f}..{max(s for s, _ in single):.1f} s, ensemble {merge[0]:.1f} s) | "
          f"predict -n {args.k} {ours[0]:.1f} s | ratio {ours[0] / total:.3f} (goal <= 0.5)")
    print(f"memory: one nnUNetv2_predict peak {peak_single:.0f} MiB (largest of the {args.k}) | predict -n {args.k} "
          f"peak {ours[1]:.0f} MiB | ratio {ours[1] / peak_single:.3f} (goal <= 1.3); difference "
          f"{ours[1] - peak_single:.0f} MiB = {(ours[1] - peak_single) * 2 ** 20 / (args.classes * voxels * 4):.2f} x "
          f"(C x voxels x 4 bytes)")
    return 0


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
