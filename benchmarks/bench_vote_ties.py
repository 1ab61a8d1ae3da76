"""Majority vote with the probability tie-break vs without, inside analyze_case's one pass (K maps, C labels).

Prints, side by side in one run: the time of ``analyze_case`` without probabilities, with the mean
probabilities (the tie-break), their ratio, how many voxels tied and how many the probabilities decided, and the
peak memory each allocates (tracemalloc) relative to the K label maps.

    OMP_NUM_THREADS=1 python benchmarks/bench_vote_ties.py [--k 10] [--shape 128 128 128] [--labels 3] [--flip 0.1]
"""
from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

from nnunet_varaug.evaluation.variability import Structure, analyze_case


def data(k: int, shape, labels: int, flip: float, seed: int = 0):
    """K maps that mostly agree (a random ``flip`` of voxels relabelled per replica) and a mean of softmaxes."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, labels, shape, dtype=np.uint8)
    maps = np.stack([np.where(rng.random(shape) < flip, rng.integers(0, labels, shape, dtype=np.uint8), base)
                     for _ in range(k)])
    logits = rng.standard_normal((labels, *shape)).astype(np.float32)
    prob = np.exp(logits) / np.exp(logits).sum(axis=0)
    return maps, prob


def timed(fn, repeat: int = 3):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return out, best, peak


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--shape", type=int, nargs=3, default=[128, 128, 128])
    p.add_argument("--labels", type=int, default=3)
    p.add_argument("--flip", type=float, default=0.1, help="fraction of voxels each replica relabels at random")
    a = p.parse_args()
    maps, prob = data(a.k, tuple(a.shape), a.labels, a.flip)
    structures = [Structure(f"l{v}", (v,)) for v in range(1, a.labels)]
    labels = list(range(a.labels))
    plain, t0, m0 = timed(lambda: analyze_case(maps, (1, 1, 1), structures, labels))
    tied, t1, m1 = timed(lambda: analyze_case(maps, (1, 1, 1), structures, labels, probabilities=prob))
    size = maps.nbytes
    print(f"K={a.k} shape={tuple(a.shape)} labels={a.labels} flip={a.flip}; K maps = {size / 2**20:.1f} MiB")
    print(f"analyze_case without probabilities: {t0:.2f} s, peak {m0 / size:.2f} x the maps")
    print(f"analyze_case with the tie-break:    {t1:.2f} s, peak {m1 / size:.2f} x the maps (probabilities passed in)")
    print(f"ratio with / without: {t1 / t0:.2f}; tied voxels {tied.tie_voxels} "
          f"({100 * tied.tie_voxels / maps[0].size:.1f} %), decided by probability {tied.ties_by_probability}; "
          f"majority maps differ at {int((tied.majority != plain.majority).sum())} voxels")


if __name__ == "__main__":
    main()
