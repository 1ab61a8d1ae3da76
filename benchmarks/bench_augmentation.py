"""What variability samples cost nnU-Net training, measured side by side in one run.

(a) augmentation: nnU-Net's default training pipeline per batch, as is (1 label channel), vs the ``_varaug``
    trainers' two flows: ``select_at_load`` (default: the choice is drawn at load time, the one chosen map is
    augmented) and ``all_channels`` (1 + K label channels carried through spatial augmentation and mirroring, then
    ``VariabilitySampleTransform``); plus the transform alone.
(b) data loading: nnU-Net's ``nnUNetDataLoader`` (crop from blosc2 files, no augmentation) per batch on the plain
    dataset vs ``VariabilitySampleDataset`` with K = 10 sample channels, in both flows.
(c) disk: a sample set's bytes per replica relative to the preprocessed segmentation files.

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_augmentation.py [--patch 64] [--shape 160] [--batches 20]``.
Timings alternate between the variants batch by batch (same seeds), so machine load hits both alike.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch


def synthetic_labels(shape, k: int, seed: int = 0):
    """GT of the synthetic dataset and K replica maps that disagree at structure borders, as replicas do."""
    from scipy import ndimage

    from nnunet_varaug.experiments.datasets import synthetic_case

    rng = np.random.default_rng(seed)
    image, gt = synthetic_case(rng, shape)
    replicas = []
    for _ in range(k):
        r = gt.copy()
        for label in (1, 2):
            mask = gt == label if label == 2 else gt >= 1
            op = ndimage.binary_dilation if rng.random() < 0.5 else ndimage.binary_erosion
            changed = op(mask, iterations=int(rng.integers(1, 3))) ^ mask
            r[changed & mask] = label - 1
            r[changed & ~mask] = label
        replicas.append(r)
    return image.astype(np.float32), gt.astype(np.int16), np.stack(replicas).astype(np.int8)


def pipelines(patch, k: int, p: float = 0.5):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_varaug.training.trainers.varaug import insert_variability_transform
    from nnunet_varaug.training.transforms import VariabilitySampleTransform

    rot = (-30 / 360 * 2 * np.pi, 30 / 360 * 2 * np.pi)
    ds = [[1.0] * 3, [0.5] * 3, [0.25] * 3, [0.125] * 3]
    build = lambda: nnUNetTrainer.get_training_transforms(patch, rot, ds, (0, 1, 2), False)  # noqa: E731
    return build(), insert_variability_transform(build(), VariabilitySampleTransform(p, k))


def bench_augmentation(patch, k: int, batches: int, batch_size: int = 2):
    from nnunet_varaug.training.transforms import VariabilitySampleTransform

    size = tuple(int(s * 1.2) for s in patch)  # nnU-Net's initial patch is larger than the final one
    image, gt, reps = synthetic_labels(size, k)
    default, varaug = pipelines(patch, k)
    alone = VariabilitySampleTransform(0.5, k)
    stack = np.concatenate([gt[None], reps.astype(np.int16)])
    times = {"default": 0.0, "select_at_load": 0.0, "all_channels": 0.0, "transform": 0.0}
    per_batch = {n: [] for n in times}
    for b in range(batches + 1):  # first batch: warm-up, not timed
        # the choice is drawn before seeding, so that all three flows augment with the same random parameters
        channels = [alone.get_parameters()["channel"] for _ in range(batch_size)]
        variants = [("default", default, lambda i: gt[None]),
                    ("select_at_load", default, lambda i: stack[channels[i]][None]),
                    ("all_channels", varaug, lambda i: stack)]
        for name, pipe, seg in (variants if b % 2 else variants[::-1]):  # alternate the order: no position bias
            torch.manual_seed(b)
            np.random.seed(b)
            start = time.perf_counter()
            for i in range(batch_size):
                pipe(image=torch.from_numpy(image.copy()), segmentation=torch.from_numpy(seg(i).copy()))
            if b:
                times[name] += time.perf_counter() - start
                per_batch[name].append(time.perf_counter() - start)
        seg = torch.from_numpy(np.concatenate([gt[None], reps.astype(np.int16)]))
        start = time.perf_counter()
        for _ in range(batch_size):
            alone(image=None, segmentation=seg[:, :patch[0], :patch[1], :patch[2]])
        if b:
            times["transform"] += time.perf_counter() - start
    medians = {n: float(np.median(np.array(per_batch[n]) / np.array(per_batch["default"])))
               for n in ("select_at_load", "all_channels")}
    return {n: t / batches for n, t in times.items()}, medians


def write_dataset(folder: str, cases: int, shape, patch, k: int):
    """A blosc2 preprocessed folder (nnU-Net's own writer and chunking) and a sample set for it."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2, comp_blosc2_params

    from nnunet_varaug.training.sampleset import save_sample_array, sample_file

    data_folder, sample_folder = os.path.join(folder, "data"), os.path.join(folder, "samples")
    os.makedirs(data_folder)
    os.makedirs(sample_folder)
    for i in range(cases):
        image, gt, reps = synthetic_labels(shape, k, seed=i)
        data, seg = image, gt[None]
        bd, cd = comp_blosc2_params(data.shape, patch, data.itemsize)
        bs, cs = comp_blosc2_params(seg.shape, patch, seg.itemsize)
        props = {"class_locations": {}, "spacing": [1.0] * 3}
        nnUNetDatasetBlosc2.save_case(data, seg, props, os.path.join(data_folder, f"case{i}"), chunks=cd, blocks=bd,
                                      chunks_seg=cs, blocks_seg=bs)
        save_sample_array(reps, sample_file(sample_folder, f"case{i}"), patch)
    return data_folder, sample_folder


def bench_loading(folder: str, patch, k: int, batches: int, batch_size: int = 2, cases: int = 4, shape=(160,) * 3):
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    from nnunet_varaug.training.sampleset import VariabilitySampleDataset, sample_file

    data_folder, sample_folder = write_dataset(folder, cases, shape, patch, k)
    lm = LabelManager({"background": 0, "organ": 1, "lesion": 2}, None)
    plain = nnUNetDatasetBlosc2(data_folder)
    from nnunet_varaug.training.transforms import VariabilitySampleTransform

    chosen = VariabilitySampleDataset(nnUNetDatasetBlosc2(data_folder), sample_folder, k,
                                      chooser=VariabilitySampleTransform(0.5, k))
    stacked = VariabilitySampleDataset(nnUNetDatasetBlosc2(data_folder), sample_folder, k)
    initial = tuple(int(s * 1.2) for s in patch)
    loaders = {name: nnUNetDataLoader(ds, batch_size, initial, patch, lm, 0.0)
               for name, ds in (("plain", plain), ("select_at_load", chosen), ("all_channels", stacked))}
    times = {n: 0.0 for n in loaders}
    for b in range(batches + 1):
        for name, loader in (list(loaders.items()) if b % 2 else list(loaders.items())[::-1]):
            np.random.seed(b)
            start = time.perf_counter()
            batch = next(loader)
            if b:
                times[name] += time.perf_counter() - start
        assert batch["target"].shape[1] == (1 + k if name == "all_channels" else 1)
    seg_bytes = sum(os.path.getsize(os.path.join(data_folder, f"case{i}_seg.b2nd")) for i in range(cases))
    sample_bytes = sum(os.path.getsize(sample_file(sample_folder, f"case{i}")) for i in range(cases))
    return {n: t / batches for n, t in times.items()}, seg_bytes, sample_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patch", type=int, default=64, help="cubic patch edge (default 64)")
    parser.add_argument("--shape", type=int, default=160, help="cubic case edge for loading/disk (default 160)")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("-k", type=int, default=10, help="number of replicas K (default 10)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    patch = (args.patch,) * 3
    print(f"patch {patch}, K = {args.k}, batch size 2, {args.batches} timed batches, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")

    t, medians = bench_augmentation(patch, args.k, args.batches)
    print(f"(a) augmentation per batch: default {t['default'] * 1e3:.1f} ms; select_at_load "
          f"{t['select_at_load'] * 1e3:.1f} ms, ratio {t['select_at_load'] / t['default']:.3f}; all_channels "
          f"{t['all_channels'] * 1e3:.1f} ms, ratio {t['all_channels'] / t['default']:.3f}; "
          f"VariabilitySampleTransform alone {t['transform'] * 1e3:.3f} ms = {t['transform'] / t['default']:.4f} "
          f"of the default pipeline; median of per-batch ratios: select_at_load {medians['select_at_load']:.3f}, "
          f"all_channels {medians['all_channels']:.3f}")
    with tempfile.TemporaryDirectory() as tmp:
        lt, seg_bytes, sample_bytes = bench_loading(tmp, patch, args.k, args.batches, shape=(args.shape,) * 3)
    print(f"(b) data loading per batch (crop, no augmentation), K={args.k}: plain {lt['plain'] * 1e3:.2f} ms; "
          f"select_at_load {lt['select_at_load'] * 1e3:.2f} ms, ratio {lt['select_at_load'] / lt['plain']:.3f}; "
          f"all_channels {lt['all_channels'] * 1e3:.2f} ms, ratio {lt['all_channels'] / lt['plain']:.3f}")
    print(f"(c) disk: preprocessed seg {seg_bytes / 4 / 1e3:.1f} kB/case, samples {sample_bytes / 4 / 1e3:.1f} kB/case "
          f"for K={args.k}: {sample_bytes / args.k / seg_bytes:.3f} x the seg file per replica")


if __name__ == "__main__":
    main()
