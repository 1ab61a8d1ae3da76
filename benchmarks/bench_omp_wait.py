"""Two CPU trainings side by side: OpenMP's default (spinning) idle threads against ``OMP_WAIT_POLICY=PASSIVE``.

``nnUNetv2_train -device cpu`` calls ``torch.set_num_threads(os.cpu_count())`` whatever ``OMP_NUM_THREADS`` says, so
two nnU-Net processes on one machine (a training and nnU-Net's export worker during validation, ``replicas
--devices`` on the CPU, SLURM's local executor, the test suite) each run one OpenMP thread per core. This script
times the same work (``--steps`` forward and backward passes of a 3D convolution stack on a 32^3 batch of 2, one
torch thread per core, as nnUNetv2_train sets them) in fresh processes, side by side in one run:

* one process alone (default wait policy), then one alone with ``OMP_WAIT_POLICY=PASSIVE``;
* two processes at the same time, default policy; two at the same time, ``PASSIVE``.

It prints each wall time and its ratio to the process alone. The tests (tests/conftest.py), the demo and
benchmarks/fidelity_numerics.py set ``OMP_WAIT_POLICY=PASSIVE`` because of these figures.

    python benchmarks/bench_omp_wait.py [--steps 40] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

WORK = """
import os, time, torch
torch.set_num_threads(os.cpu_count())  # what nnUNetv2_train -device cpu does
torch.manual_seed(0)
net = torch.nn.Sequential(*[m for _ in range(4) for m in (torch.nn.Conv3d(8, 8, 3, padding=1),
                                                          torch.nn.InstanceNorm3d(8), torch.nn.LeakyReLU())])
x = torch.randn(2, 8, 32, 32, 32)
net(x).sum().backward()  # warm-up
t = time.perf_counter()
for _ in range({steps}):
    net(x).sum().backward()
print(time.perf_counter() - t)
"""


def run(copies: int, policy: str, steps: int) -> float:
    """Wall time of ``copies`` processes started together (the slowest one's loop), in seconds."""
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    procs = [subprocess.Popen([sys.executable, "-c", WORK.format(steps=steps)], env=env, stdout=subprocess.PIPE,
                              text=True) for _ in range(copies)]
    times = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode != 0:
            raise RuntimeError("a worker failed")
        times.append(float(out.strip()))
    return max(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cases = [("alone, default policy", 1, ""), ("alone, PASSIVE", 1, "PASSIVE"),
             ("two side by side, default policy", 2, ""), ("two side by side, PASSIVE", 2, "PASSIVE")]
    results = {name: [] for name, _, _ in cases}
    for _ in range(args.repeats):  # interleaved, so that a change in the machine's load touches every case
        for name, copies, policy in cases:
            results[name].append(run(copies, policy, args.steps))
    base = statistics.median(results[cases[0][0]])
    print(f"{os.cpu_count()} cores, torch threads = cores, {args.steps} steps, median of {args.repeats} runs")
    print("| processes | median s | ratio to one alone |")
    print("|---|---|---|")
    for name, _, _ in cases:
        m = statistics.median(results[name])
        print(f"| {name} | {m:.2f} | {m / base:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
