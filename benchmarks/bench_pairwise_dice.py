"""Pairwise Dice of K = 10 replica label maps (160x192x160, 5 labels): one pass vs SimpleITK, pair by pair.

Prints both timings side by side, their ratio, the largest difference of the Dice values, and the peak memory
that the one-pass computation allocates (tracemalloc) relative to the K label maps themselves.

    OMP_NUM_THREADS=1 python benchmarks/bench_pairwise_dice.py [--k 10] [--shape 160 192 160] [--labels 5]
"""
from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np
import SimpleITK as sitk

from nnunet_varaug.evaluation.variability import Structure, pair_indices, pairwise_dice


def replica_maps(k: int, shape, labels: int, noise: str = "salt", seed: int = 0) -> np.ndarray:
    """K maps of ``labels`` ellipsoidal blobs that mostly agree.

    noise="boundary": each replica moves each blob's center and radius a little (replicas disagree at borders,
    as trained replicas do); noise="salt": on top of that, 5% of each replica's voxels get a random label
    (a worst case: a third of all voxels are not unanimous).
    """
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij")
    blobs = [(rng.uniform(-0.5, 0.5, 3), rng.uniform(0.15, 0.35)) for _ in range(labels)]
    maps = np.zeros((k, *shape), np.uint8)
    for i in range(k):
        for lab, (c, r) in enumerate(blobs, start=1):
            c = c + rng.normal(0, 0.01, 3)
            r = r * (1 + rng.normal(0, 0.02))
            maps[i][sum((g - ci) ** 2 for g, ci in zip(grids, c)) < r * r] = lab
        if noise == "salt":
            salt = rng.random(shape, dtype=np.float32) < 0.05
            maps[i][salt] = rng.integers(0, labels + 1, int(salt.sum()), dtype=np.uint8)
    return maps


def sitk_pairwise(maps: np.ndarray, labels: int) -> np.ndarray:
    k = maps.shape[0]
    images = [sitk.GetImageFromArray(m) for m in maps]
    out = np.ones((labels, k, k))
    f = sitk.LabelOverlapMeasuresImageFilter()
    for a, b in pair_indices(k):
        f.Execute(images[a], images[b])
        for lab in range(1, labels + 1):
            out[lab - 1, a, b] = out[lab - 1, b, a] = f.GetDiceCoefficient(lab)
    return out


def measure(maps: np.ndarray, labels: int, repeats: int, threads: int):
    structures = [Structure(str(l), (l,)) for l in range(1, labels + 1)]
    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(threads)
    ours, theirs = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        d_ours = pairwise_dice(maps, structures)
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        d_sitk = sitk_pairwise(maps, labels)
        theirs.append(time.perf_counter() - t)
    tracemalloc.start()
    pairwise_dice(maps, structures)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return min(ours), min(theirs), float(np.abs(d_ours - d_sitk).max()), peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--shape", type=int, nargs=3, default=(160, 192, 160))
    p.add_argument("--labels", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sitk-threads", type=int, default=1, help="SimpleITK threads (ours is single-threaded numpy)")
    args = p.parse_args()
    pairs = len(pair_indices(args.k))
    print(f"K={args.k} maps of {tuple(args.shape)}, {args.labels} labels, {pairs} pairs; best of {args.repeats}; "
          f"SimpleITK on {args.sitk_threads} thread(s)")
    print(f"{'noise':>9} {'unanimous':>9} {'one pass':>9} {'SimpleITK':>10} {'speed-up':>8} {'max|diff|':>9} "
          f"{'peak extra memory':>30}")
    for noise in ("boundary", "salt"):
        maps = replica_maps(args.k, args.shape, args.labels, noise)
        unanimous = float(np.logical_and.reduce(maps[1:] == maps[0], axis=0).mean())
        ours, theirs, diff, peak = measure(maps, args.labels, args.repeats, args.sitk_threads)
        print(f"{noise:>9} {unanimous:>9.1%} {ours:>8.3f}s {theirs:>9.3f}s {theirs / ours:>7.1f}x {diff:>9.2g} "
              f"{peak / 2**20:>8.1f} MiB = {peak / maps.nbytes:.3f}x maps")
    print(f"(the K label maps: {maps.nbytes / 2**20:.1f} MiB; values identical when max|diff| < 1e-12)")


if __name__ == "__main__":
    main()
