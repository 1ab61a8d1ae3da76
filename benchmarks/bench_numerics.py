"""Cost of stochastic rounding: nnU-Net training steps of ``_ieee``, ``_mca0`` and ``_mca0_instr``, side by side.

All sides are real nnU-Net trainers built from the same plans (by default nnU-Net plans a synthetic dataset of
``--shape`` in a temporary folder; ``--plans/--dataset-json`` use yours): ``<trainer>_ieee`` (the float32
training path of the numerical replicas, no noise: the reference of every ratio), ``<trainer>_mca0`` (exact
stochastic rounding per op) and, with ``--sides ieee op instr``, ``<trainer>_mca0_instr`` (per instruction).
Each is initialised (PlainConvUNet, deep-supervision DC+CE loss, SGD) and its own ``train_step`` (forward,
loss, backward, gradient clipping, optimizer step) is timed on the same batch of ``--batch`` patches, the
sides alternating so that they see the same machine load. Each step is timed in wall time and in the process's
CPU time (the better measure on a loaded machine; ratios are reported for both). ``--profile`` adds one step per
MCA side with the mode's per-op profile (CPU seconds, values rounded, route of each aten op, and the additions
left at one rounding). ``--device cuda`` times the same on a GPU (TF32 off on every side, as the replicas train;
the numerics then run their PyTorch reference code, which gives the CPU kernels' bits).

    OMP_NUM_THREADS=1 python benchmarks/bench_numerics.py --shape 32 32 32 --profile       # op level, CPU
    OMP_NUM_THREADS=1 python benchmarks/bench_numerics.py --shape 32 32 32 -tr nnUNetTrainerTiny \
        --sides ieee op instr --steps 5                                                     # + instruction level
    python benchmarks/bench_numerics.py --device cuda --shape 32 32 32 --sides ieee op instr   # GPU
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--shape", type=int, nargs=3, default=[64, 64, 64], help="synthetic case shape to plan for")
    p.add_argument("--plans", help="an nnU-Net plans JSON to use instead of planning a synthetic dataset")
    p.add_argument("--dataset-json", help="the dataset.json belonging to --plans")
    p.add_argument("-c", "--configuration", default="3d_fullres")
    p.add_argument("-tr", "--trainer", default="nnUNetTrainer",
                   help="base trainer (default nnUNetTrainer); sides are <trainer>_ieee, _mca0, _mca0_instr")
    p.add_argument("--sides", nargs="+", default=["ieee", "op"], choices=["ieee", "op", "instr"],
                   help="which sides to time (default: ieee op); ratios are to ieee")
    p.add_argument("--batch", type=int, default=2, help="patches per batch (default 2)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per side (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per side first (default 1)")
    p.add_argument("--virtual-bits", type=int, default=None, help="t for the MCA side (default 24)")
    p.add_argument("--profile", action="store_true",
                   help="after the timed steps, one more step per MCA side with the mode's per-op profile: time, "
                        "values rounded, route, and the additions left at one rounding")
    return p.parse_args(argv)


def plan_synthetic(shape, root: str):
    """Plan a small synthetic dataset of ``shape`` with nnU-Net's own fingerprint extractor and planner."""
    from nnunet_varaug.experiments.datasets import make_synthetic_dataset
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprint_dataset,
                                                                       plan_experiment_dataset)

    dataset_id = 990
    folder = make_synthetic_dataset(dataset_id, raw_root=os.environ["nnUNet_raw"], num_cases=4, shape=shape,
                                    seed=0)
    with contextlib.redirect_stdout(sys.stderr):
        extract_fingerprint_dataset(dataset_id, num_processes=1, show_progress_bar=False, verbose=False)
        plan_experiment_dataset(dataset_id)
    pre = os.path.join(os.environ["nnUNet_preprocessed"], os.path.basename(folder))
    with open(os.path.join(pre, "nnUNetPlans.json")) as f:
        plans = json.load(f)
    with open(os.path.join(folder, "dataset.json")) as f:
        dataset_json = json.load(f)
    return plans, dataset_json


def make_batch(trainer, batch: int, device):
    """A batch like nnU-Net's loader gives: images and one downsampled label map per deep-supervision output."""
    import torch

    g = torch.Generator().manual_seed(0)
    patch = [int(s) for s in trainer.configuration_manager.patch_size]
    data = torch.randn((batch, trainer.num_input_channels, *patch), generator=g)
    labels = torch.randint(0, trainer.label_manager.num_segmentation_heads, (batch, 1, *patch), generator=g)
    targets = []
    for scale in trainer._get_deep_supervision_scales():
        step = [round(1 / s) for s in scale]
        targets.append(labels[(slice(None), slice(None)) + tuple(slice(None, None, k) for k in step)].float())
    return {"data": data.to(device), "target": [t.to(device) for t in targets]}


def print_profile(name: str, trainer, batch) -> None:
    """One more step of ``trainer`` with the mode's per-op profile; prints the ops by time."""
    from nnunet_varaug.training.numerics.profile import summary

    trainer.mca.profile = {}
    trainer.train_step(batch)
    profile, trainer.mca.profile = trainer.mca.profile, None
    total = summary(profile)
    print(f"\nper-op profile of {name} (one step, {total['seconds']:.2f} s in rounded ops; "
          f"{total['rounded'] / 1e6:.1f} M values rounded, {total['once'] / 1e6:.3f} M additions left at one "
          f"rounding = {100 * total['once_share']:.3f} %)")
    print(f"{'aten op':48}{'calls':>6}{'seconds':>9}{'share':>7}{'rounded (M)':>13}{'once (M)':>10}  routes")
    for op, e in sorted(profile.items(), key=lambda kv: -kv[1]["seconds"]):
        if e["rounded"] or e["once"] or e["seconds"] > 0.01 * total["seconds"]:
            routes = ", ".join(f"{k} {v}" for k, v in e["routes"].items())
            print(f"{op:48}{e['calls']:>6}{e['seconds']:>9.3f}{100 * e['seconds'] / total['seconds']:>6.1f}%"
                  f"{e['rounded'] / 1e6:>13.2f}{e['once'] / 1e6:>10.3f}  {routes}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if "ieee" not in args.sides:
        args.sides = ["ieee", *args.sides]
    with tempfile.TemporaryDirectory() as root:
        for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            os.environ.setdefault(v, os.path.join(root, v))
            os.makedirs(os.environ[v], exist_ok=True)
        os.environ["nnUNet_compile"] = "f"
        import torch

        from nnunet_varaug.training import registry
        from nnunet_varaug.training.numerics import kernels

        if args.plans:
            with open(args.plans) as f:
                plans = json.load(f)
            with open(args.dataset_json) as f:
                dataset_json = json.load(f)
        else:
            plans, dataset_json = plan_synthetic(args.shape, root)
        device = torch.device(args.device)
        # initialize() infers the dataset class from the preprocessed folder's file type; no data is read.
        data_folder = os.path.join(os.environ["nnUNet_preprocessed"], plans["dataset_name"],
                                   plans["configurations"][args.configuration].get("data_identifier", "none"))
        if not os.path.isdir(data_folder):
            os.makedirs(data_folder)
            open(os.path.join(data_folder, "placeholder.b2nd"), "w").close()
        t = f"_t{args.virtual_bits}" if args.virtual_bits else ""
        names = {"ieee": f"{args.trainer}_ieee", "op": f"{args.trainer}_mca0{t}",
                 "instr": f"{args.trainer}_mca0{t}_instr"}
        trainers = {}
        with contextlib.redirect_stdout(sys.stderr):
            for label in args.sides:
                torch.manual_seed(0)
                cls = registry.resolve(names[label])
                tr = cls({**plans, "continue_training": False}, args.configuration, 0, dataset_json, device)
                tr.initialize()
                tr.network.train()
                trainers[label] = tr
        batch = make_batch(trainers["ieee"], args.batch, device)
        times = {label: [] for label in args.sides}

        cpu = {label: [] for label in args.sides}

        def step(label: str):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, start_cpu = time.perf_counter(), time.process_time()
            trainers[label].train_step(batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - start, time.process_time() - start_cpu

        for i in range(args.warmup + args.steps):
            for label in args.sides:
                elapsed, elapsed_cpu = step(label)
                if i >= args.warmup:
                    times[label].append(elapsed)
                    cpu[label].append(elapsed_cpu)
        cm = trainers["ieee"].configuration_manager
        print(f"device {device} ({torch.get_num_threads()} CPU threads), torch {torch.__version__}; "
              f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}; kernels: {kernels.status()}")
        print(f"trainer {args.trainer}, network {cm.network_arch_class_name.split('.')[-1]}, patch "
              f"{list(cm.patch_size)}, batch {args.batch}, "
              f"{sum(p.numel() for p in trainers['ieee'].network.parameters()) / 1e6:.3f} M parameters, "
              f"{args.steps} timed steps per side after {args.warmup} warm-up")
        for label in args.sides:
            if label != "ieee":
                mca = trainers[label].mca
                n = args.warmup + args.steps
                print(f"{names[label]}: {mca!r}; per step {mca.perturbed_ops // n} ops, "
                      f"{mca.perturbed_elements / n / 1e6:.1f} M values rounded")
        base, base_cpu = statistics.median(times["ieee"]), statistics.median(cpu["ieee"])
        print(f"{'side':28}{'median s/step':>15}{'min':>10}{'ratio to _ieee':>16}{'CPU s/step':>12}{'CPU ratio':>11}")
        for label in args.sides:
            med, med_cpu = statistics.median(times[label]), statistics.median(cpu[label])
            print(f"{names[label]:28}{med:>15.4f}{min(times[label]):>10.4f}{med / base:>16.2f}{med_cpu:>12.4f}"
                  f"{med_cpu / base_cpu:>11.2f}")
        if args.profile:
            for label in args.sides:
                if label != "ieee":
                    print_profile(names[label], trainers[label], batch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
