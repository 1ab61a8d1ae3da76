"""Cost of MCA random rounding: one nnU-Net training step with vs without the perturbation, side by side.

Both sides are real nnU-Net: ``nnUNetTrainer`` and ``nnUNetTrainer_mca0`` (the plugin's numerical replica) are
built from the same plans (by default nnU-Net plans a synthetic dataset of ``--shape`` in a temporary folder;
``--plans/--dataset-json`` use yours), each initialised (PlainConvUNet, deep-supervision DC+CE loss, SGD), and
their own ``train_step`` (forward, loss, backward, gradient clipping, optimizer step) is timed on the same batch
of ``--batch`` patches, alternating plain and MCA steps so that both see the same machine load. The MCA side
trains in float32 (as every ``_mca`` replica does); with ``--device cuda`` the plain side keeps nnU-Net's
autocast (what users run) unless ``--plain-float32`` is given.

    OMP_NUM_THREADS=1 python benchmarks/bench_numerics.py                 # CPU, 64^3 plan, batch 2
    python benchmarks/bench_numerics.py --device cuda --shape 128 128 128
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
                   help="base trainer (default nnUNetTrainer); the MCA side is <trainer>_mca0")
    p.add_argument("--batch", type=int, default=2, help="patches per batch (default 2)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per side (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per side first (default 1)")
    p.add_argument("--virtual-bits", type=int, default=None, help="t for the MCA side (default 24)")
    p.add_argument("--plain-float32", action="store_true", help="CUDA: plain side without autocast too")
    return p.parse_args(argv)


def plan_synthetic(shape, root: str):
    """Plan a small synthetic dataset of ``shape`` with nnU-Net's own fingerprint extractor and planner."""
    from nnunet_varaug.datasets import make_synthetic_dataset
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


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as root:
        for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            os.environ.setdefault(v, os.path.join(root, v))
            os.makedirs(os.environ[v], exist_ok=True)
        os.environ["nnUNet_compile"] = "f"
        import torch

        from nnunet_varaug import registry

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
        mca_name = f"{args.trainer}_mca0" + (f"_t{args.virtual_bits}" if args.virtual_bits else "")
        trainers = {}
        with contextlib.redirect_stdout(sys.stderr):
            for label, cls in (("plain", registry.resolve(args.trainer)), ("mca", registry.resolve(mca_name))):
                torch.manual_seed(0)
                tr = cls({**plans, "continue_training": False}, args.configuration, 0, dataset_json, device)
                tr.initialize()
                tr.network.train()
                if label == "plain" and args.plain_float32:
                    tr.grad_scaler = None
                trainers[label] = tr
        batch = make_batch(trainers["plain"], args.batch, device)
        times = {"plain": [], "mca": []}

        def step(label: str) -> float:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            trainers[label].train_step(batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - start

        for i in range(args.warmup + args.steps):
            for label in ("plain", "mca"):
                elapsed = step(label)
                if i >= args.warmup:
                    times[label].append(elapsed)
        mca = trainers["mca"].mca
        cm = trainers["plain"].configuration_manager
        plain_t, mca_t = statistics.median(times["plain"]), statistics.median(times["mca"])
        print(f"device {device} ({torch.get_num_threads()} CPU threads), torch {torch.__version__}")
        print(f"trainer {args.trainer}, network {cm.network_arch_class_name.split('.')[-1]}, patch {list(cm.patch_size)}, batch "
              f"{args.batch}, {sum(p.numel() for p in trainers['plain'].network.parameters()) / 1e6:.2f} M parameters")
        print(f"MCA: {mca!r}; per step {mca.perturbed_ops // (args.warmup + args.steps)} ops perturbed, "
              f"{mca.perturbed_elements / (args.warmup + args.steps) / 1e6:.1f} M values")
        print(f"{'':8}{'median s/step':>15}{'min':>10}")
        for label in ("plain", "mca"):
            print(f"{label:8}{statistics.median(times[label]):>15.4f}{min(times[label]):>10.4f}")
        print(f"ratio mca/plain: {mca_t / plain_t:.3f} (median), {min(times['mca']) / min(times['plain']):.3f} (min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
