"""What issue 19's per-case work costs, side by side in one run: per replica (calibration counts over all voxels
and the ROI, the temperature fit's NLL on its grid) against the entropy map predict computes anyway; per case
(structures.csv's row, the lesion view, Dice + MONAI's normalized surface Dice) against the disagreement map.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_uncertainty_extras.py [size]`` (default 96³, 3 classes,
K = 5). Prints seconds and ratios; docs/performance.md records a run.
"""
from __future__ import annotations

import sys
import time

import numpy as np

from nnunet_varaug.evaluation import calibration, temperature, uncertainty
from nnunet_varaug.evaluation.case_record import record_from_arrays
from nnunet_varaug.evaluation.variability import Structure


def timed(fn, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main(size: int = 96, k: int = 5) -> None:
    rng = np.random.default_rng(0)
    shape = (size,) * 3
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, size)] * 3, indexing="ij")
    r = np.sqrt(zz ** 2 + yy ** 2 + xx ** 2)
    gt = (r < 0.6).astype(np.uint8) + (np.sqrt((zz - 0.2) ** 2 + yy ** 2 + xx ** 2) < 0.15)
    logits = np.stack([-(r - 0.6) * 0, (0.6 - r) * 12, (0.15 - np.sqrt((zz - 0.2) ** 2 + yy ** 2 + xx ** 2)) * 20])
    probs = []
    for _ in range(k):
        z = logits + rng.normal(scale=0.8, size=logits.shape)
        e = np.exp(z - z.max(0))
        probs.append((e / e.sum(0)).astype(np.float32))
    p = probs[0]
    counts = calibration.CalibrationCounts([0, 1, 2])
    t_entropy = timed(lambda: uncertainty.entropy_bits(p))
    t_cal = timed(lambda: counts.add_case("m", p, gt, None, (1.0, 1.0, 1.0)))
    t_nll = timed(lambda: temperature.nll_sums(p, gt, [0, 1, 2]), repeat=1)
    maps = np.stack([q.argmax(0).astype(np.uint8) for q in probs])
    mean = np.mean(probs, axis=0).astype(np.float32)
    consensus = mean.argmax(0).astype(np.uint8)
    h = uncertainty.entropy_bits(mean)
    mi = np.maximum(h - np.mean([uncertainty.entropy_bits(q) for q in probs], axis=0), 0).astype(np.float32)
    st = [Structure("organ", (1,)), Structure("lesion", (2,))]
    t_dis = timed(lambda: uncertainty.disagreement(maps, consensus))
    t_rows = timed(lambda: record_from_arrays(maps, consensus, mean, h, mi, (1.0, 1.0, 1.0), st, [0, 1, 2]))
    t_lesions = timed(lambda: record_from_arrays(maps, consensus, mean, h, mi, (1.0, 1.0, 1.0), st, [0, 1, 2],
                                                 instances=["lesion"]))
    t_labels = timed(lambda: record_from_arrays(maps, consensus, mean, h, mi, (1.0, 1.0, 1.0), st, [0, 1, 2],
                                                gt=gt), repeat=1)
    print(f"{size}^3 voxels, 3 classes, K = {k} (best of 3, s):")
    print(f"  per replica: entropy map {t_entropy:.3f}; calibration counts, all + ROI {t_cal:.3f} "
          f"(x{t_cal / t_entropy:.1f}); temperature NLL on {temperature.GRID} temperatures {t_nll:.3f} "
          f"(x{t_nll / t_entropy:.1f})")
    print(f"  per case: disagreement map {t_dis:.3f}; structures.csv rows {t_rows:.3f} (x{t_rows / t_dis:.1f}); "
          f"+ lesions {t_lesions:.3f} (x{t_lesions / t_dis:.1f}); + Dice and NSD to labels {t_labels:.3f} "
          f"(x{t_labels / t_dis:.1f})")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 96)
