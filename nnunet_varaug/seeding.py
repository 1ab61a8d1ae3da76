"""Seed every random number generator of nnU-Net training, including the data-augmentation workers.

nnU-Net seeds nothing and uses ``NonDetMultiThreadedAugmenter``, which hands out batches in whatever order its
workers finish them. A seed replica needs the opposite: the same name trained twice gives the same weights.
We therefore (1) seed python, numpy and torch (CPU and CUDA) from the replica index, and (2) swap nnU-Net's
augmenters, only while ``get_dataloaders`` builds them, for batchgenerators' order-deterministic
``MultiThreadedAugmenter`` whose workers seed all three generators from ``derive_seed(K, ...)``.
"""
from __future__ import annotations

import contextlib
import random
import zlib
from typing import Iterator

import numpy as np
import torch


def derive_seed(*keys) -> int:
    """A 32-bit seed from a tuple of ints and strings, stable across processes and Python versions."""
    words = [k if isinstance(k, int) else zlib.crc32(str(k).encode()) for k in keys]
    return int(np.random.SeedSequence(words).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's global generator and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def make_deterministic() -> None:
    """Ask cuDNN for deterministic kernels (nnU-Net turns on benchmark mode, which picks kernels by timing)."""
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


class SeededWorkerLoader:
    """Wraps an nnU-Net data loader so that each augmentation worker seeds python, numpy and torch.

    batchgenerators' producer seeds numpy only, then calls ``set_thread_id``; we seed all three there.
    The wrapper lives in this importable module so that it pickles under any start method.
    """

    def __init__(self, loader, seed: int):
        self.loader = loader
        self.seed = seed

    def set_thread_id(self, thread_id: int) -> None:
        seed_everything(derive_seed(self.seed, thread_id))
        self.loader.set_thread_id(thread_id)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.loader)

    def __getattr__(self, item):
        if item == "loader":  # not yet set (e.g. during unpickling)
            raise AttributeError(item)
        return getattr(self.loader, item)


@contextlib.contextmanager
def seeded_augmenters(seed: int) -> Iterator[None]:
    """While active, nnU-Net's trainer builds seeded, order-deterministic augmenters.

    The first augmenter built is the training one, the second the validation one; each gets its own stream.
    """
    from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as trainer_module

    built = []

    def deterministic_augmenter(data_loader, transform, num_processes, num_cached=2, seeds=None,
                                pin_memory=False, wait_time=0.02, **_):
        stream = derive_seed(seed, "augmenter", len(built))
        built.append(stream)
        per_queue = max(2, num_cached // max(1, num_processes))
        return MultiThreadedAugmenter(SeededWorkerLoader(data_loader, stream), transform, num_processes,
                                      num_cached_per_queue=per_queue,
                                      seeds=[derive_seed(stream, i) for i in range(num_processes)],
                                      pin_memory=pin_memory, wait_time=wait_time)

    original = trainer_module.NonDetMultiThreadedAugmenter
    trainer_module.NonDetMultiThreadedAugmenter = deterministic_augmenter
    try:
        yield
    finally:
        trainer_module.NonDetMultiThreadedAugmenter = original
