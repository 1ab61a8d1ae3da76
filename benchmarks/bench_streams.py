"""What separate sampling and augmentation streams cost: nnU-Net's training batches drawn by ``nnUNetTrainerTiny``
(nnU-Net's loader on the global generators) against ``nnUNetTrainerTiny_seed0`` (the same loader inside
:class:`~nnunet_varaug.training.seeding.SeededWorkerLoader`: the generators' states swapped in for the sampling of
each batch and for the transforms of each sample), both without augmentation workers, in this process.

Builds the test suite's synthetic dataset (10 cases of 32³) in a temporary folder, plans and preprocesses it, builds
both trainers' loaders, then draws ``--batches`` batches from each, interleaved one by one, and prints the median
CPU time per batch of each (this process's CPU time: on a shared machine the wall time follows the load) and their
ratio; also the CPU cost of one stream activation (``RandomStream.active``) alone.

    OMP_NUM_THREADS=1 python benchmarks/bench_streams.py [--batches 60] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import timeit

from _workspace import nnunet_folders, workspace

BIN = os.path.dirname(sys.executable)
DATASET = 987


def build(name: str, dataset: str):
    import torch

    from nnunet_varaug.training.registry import resolve

    base = os.path.join(os.environ["nnUNet_preprocessed"], dataset)
    with open(os.path.join(base, "nnUNetPlans.json")) as f:
        plans = {**json.load(f), "continue_training": False}  # as nnUNetv2_train passes them
    with open(os.path.join(base, "dataset.json")) as f:
        dataset_json = json.load(f)
    trainer = resolve(name)(plans, "3d_fullres", 0, dataset_json, device=torch.device("cpu"))
    trainer.initialize()
    return trainer.get_dataloaders()[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, default=60)
    p.add_argument("--keep", default=None, help="work in this folder and keep it (a second run reuses its dataset)")
    args = p.parse_args(argv)
    with workspace(args.keep, "bench_streams_") as root:
        env = {**nnunet_folders(root), "nnUNet_n_proc_DA": "0", "nnUNet_compile": "f"}
        os.environ.update(env)
        from nnunet_varaug.experiments.datasets import make_synthetic_dataset
        from nnunet_varaug.training.seeding import RandomStream

        raw = make_synthetic_dataset(DATASET, env["nnUNet_raw"], name="BenchStreams", num_cases=10, seed=1)
        dataset = os.path.basename(raw)
        if not os.path.isfile(os.path.join(env["nnUNet_preprocessed"], dataset, "nnUNetPlans.json")):
            subprocess.run([os.path.join(BIN, "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET), "-c",
                            "3d_fullres", "-np", "1", "-npfp", "1"], env={**os.environ, "nnUNet_n_proc_DA": "1"},
                           check=True, capture_output=True)
        loaders = {"nnU-Net's loader (global generators)": build("nnUNetTrainerTiny", dataset),
                   "_seed0's loader (two streams)": build("nnUNetTrainerTiny_seed0", dataset)}
        times = {k: [] for k in loaders}
        for _ in range(args.batches):
            for key, loader in loaders.items():
                start = time.process_time()  # CPU time: on a shared machine, wall time follows the load
                next(loader)
                times[key].append(time.process_time() - start)
        stream = RandomStream(1)

        def activate():
            with stream.active():
                pass

        timer = timeit.Timer(activate, timer=time.process_time)
        swap = min(timer.repeat(number=200, repeat=7)) / 200  # CPU time, the least disturbed of 7 runs
        medians = {k: statistics.median(v) for k, v in times.items()}
        print(f"{args.batches} training batches each (batch 2, patch 32³, nnU-Net's augmentation), interleaved, "
              f"0 workers, torch threads {__import__('torch').get_num_threads()}:")
        for key, value in medians.items():
            print(f"  {key:40s} median {1000 * value:8.2f} ms CPU per batch")
        plain, streamed = medians.values()
        print(f"  ratio streams / nnU-Net's: {streamed / plain:.3f}")
        print(f"  one stream activation (3 generators' states swapped in and out, best of 7 x 200): "
              f"{1e6 * swap:.1f} µs; a batch of 2 samples makes 3")
    return 0


if __name__ == "__main__":
    sys.exit(main())
