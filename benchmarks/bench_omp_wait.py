"""Two CPU trainings side by side: OpenMP's default idle threads against ``OMP_WAIT_POLICY=PASSIVE`` and
``GOMP_SPINCOUNT``.

``nnUNetv2_train -device cpu`` calls ``torch.set_num_threads(os.cpu_count())`` whatever ``OMP_NUM_THREADS`` says, so
two nnU-Net processes on one machine (``replicas --devices`` or ``benchmark --devices`` on the CPU, SLURM's local
executor, two studies at once) each run one OpenMP thread per core. This script times the same work (``--steps``
forward and backward passes through convolution stacks shaped like ``nnUNetTrainerTiny``'s encoder stages at
32^3, batch 2: many small ops, one torch thread per core as nnUNetv2_train sets them) in fresh processes, side by
side in one run, interleaved ``--repeats`` times: one process alone and two at the same time, each with OpenMP's
default wait policy, with ``OMP_WAIT_POLICY=PASSIVE`` (idle threads sleep) and with each ``--spincounts`` value
of ``GOMP_SPINCOUNT`` (spin that many times, then sleep). It prints the median wall time of each case and its
ratio to one process alone with the default policy (docs/performance.md).

    python benchmarks/bench_omp_wait.py [--steps 30] [--repeats 3] [--spincounts 10000 100000]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

WORK = """
import os, time, torch
torch.set_num_threads(os.cpu_count())  # what nnUNetv2_train -device cpu does
torch.manual_seed(0)
# the stages of nnUNetTrainerTiny's encoder at 32^3: many small ops, as in the tests' and the demo's trainings
stages = [(8, 32), (16, 16), (32, 8), (64, 4)]
nets = [torch.nn.Sequential(*[m for _ in range(2) for m in (torch.nn.Conv3d(c, c, 3, padding=1),
                                                           torch.nn.InstanceNorm3d(c), torch.nn.LeakyReLU())])
        for c, _ in stages]
xs = [torch.randn(2, c, n, n, n) for c, n in stages]
def step():
    sum(net(x).sum() for net, x in zip(nets, xs)).backward()
step()  # warm-up
t = time.perf_counter()
for _ in range({steps}):
    step()
print(time.perf_counter() - t)
"""


def run(copies: int, policy: str, steps: int) -> float:
    """Wall time of ``copies`` processes started together (the slowest one's loop), in seconds; ``policy`` is
    ``""`` (OpenMP's default), ``PASSIVE`` or ``SPIN=<n>`` (``GOMP_SPINCOUNT=<n>``: spin n times, then sleep)."""
    env = dict(os.environ)
    for key in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        env.pop(key, None)
    if policy.startswith("SPIN="):
        env["GOMP_SPINCOUNT"] = policy[len("SPIN="):]
    elif policy:
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
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--spincounts", nargs="*", default=["10000", "100000"],
                    help="GOMP_SPINCOUNT values to try besides the two policies")
    args = ap.parse_args()
    cases = [(f"{where}, {name}", copies, policy) for where, copies in (("alone", 1), ("two side by side", 2))
             for name, policy in (("default", ""), ("OMP_WAIT_POLICY=PASSIVE", "PASSIVE"),
                                  *((f"GOMP_SPINCOUNT={n}", f"SPIN={n}") for n in args.spincounts))]
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
