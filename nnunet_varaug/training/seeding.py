"""Seed every random number generator of nnU-Net training, including the data-augmentation workers.

nnU-Net seeds nothing and uses ``NonDetMultiThreadedAugmenter``, which hands out batches in whatever order its
workers finish them. A seed replica needs the opposite: the same name trained twice gives the same weights.
We therefore (1) seed python, numpy and torch (CPU and CUDA) from the replica index, (2) swap nnU-Net's
augmenters, only while ``get_dataloaders`` builds them, for batchgenerators' order-deterministic
``MultiThreadedAugmenter`` whose workers seed all three generators from ``derive_seed(K, ...)``, (3) build
nnU-Net's ``GaussianBlurTransform`` with ``benchmark=False`` (nnU-Net asks for ``benchmark=True``: the first blur of
each axis length and kernel size in a process times direct against FFT convolution and keeps the faster, and the
two differ in the last bits, so the augmented images depended on wall time), and (4) arrange
deterministic kernels on the GPU: ``torch.use_deterministic_algorithms(True, warn_only=True)`` (an op without a
deterministic kernel warns instead of stopping training; :class:`NondeterminismRecorder` keeps those warnings for
the record), cuDNN deterministic with benchmark mode off, ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (cuBLAS reads it when
it creates its first handle, see PyTorch's "Reproducibility" notes) and no ``torch.compile`` unless the user asks
for it through nnU-Net's ``nnUNet_compile`` (inductor's autotuning may pick kernels by timing).
"""
from __future__ import annotations

import contextlib
import os
import random
import re
import warnings
import zlib
from typing import Dict, Iterator, List, MutableMapping, Optional, Tuple

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


CUBLAS_CONFIG = ":4096:8"
DETERMINISTIC_CUBLAS_CONFIGS = (":4096:8", ":16:8")  # the two values cuBLAS is deterministic with
NONDETERMINISTIC_ALERT = re.compile(r"does not have a deterministic implementation")


def configure_cublas(environ: Optional[MutableMapping[str, str]] = None) -> Dict[str, object]:
    """Set ``CUBLAS_WORKSPACE_CONFIG`` to ``:4096:8`` unless it already holds a deterministic value.

    cuBLAS reads the variable when a process creates its first cuBLAS handle (its first matrix product on a GPU),
    so this must run before that: ``nnUNetv2_train`` builds the trainer (whose ``__init__`` calls this) before it
    initialises CUDA or builds the network. Returns what was done, for debug.json; ``cuda_initialized`` True means
    CUDA was already in use in this process, so the value may have come too late.
    """
    environ = os.environ if environ is None else environ
    before = environ.get("CUBLAS_WORKSPACE_CONFIG")
    if before in DETERMINISTIC_CUBLAS_CONFIGS:
        set_by = "user"
    else:
        environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_CONFIG
        set_by = "nnunet_varaug" if before is None else f"nnunet_varaug (replaced the user's '{before}')"
    return {"CUBLAS_WORKSPACE_CONFIG": environ["CUBLAS_WORKSPACE_CONFIG"], "set_by": set_by,
            "cuda_initialized": bool(torch.cuda.is_initialized())}


def compile_decision(environ: Optional[MutableMapping[str, str]] = None) -> Tuple[Optional[bool], str]:
    """Whether a seed replica uses ``torch.compile``: off unless the user set ``nnUNet_compile``.

    Returns ``(False, reason)`` when the plugin turns it off, ``(None, reason)`` when the user's explicit
    ``nnUNet_compile`` decides (nnU-Net's own ``_do_i_compile`` then applies it, device rules included).
    """
    environ = os.environ if environ is None else environ
    if "nnUNet_compile" in environ:
        return None, f"nnUNet_compile={environ['nnUNet_compile']} set by the user (nnU-Net decides)"
    return False, ("off for seed replicas (inductor's autotuning can pick kernels by timing); "
                   "nnUNet_compile=t turns it on")


def make_deterministic() -> Dict[str, object]:
    """Deterministic kernels: ``torch.use_deterministic_algorithms(True, warn_only=True)``, cuDNN deterministic
    and benchmark mode off (nnU-Net's ``run_training`` turns benchmark mode on, which picks kernels by timing).
    Returns the settings as torch reports them afterwards."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    return {"deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
            "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark)}


def platform_record(device: "torch.device", cpuinfo: str = "/proc/cpuinfo") -> Dict[str, object]:
    """What the weights depend on besides the seed: PyTorch promises reproducible results only on one platform and
    release, and the same replica trained on two 2-core VMs with different CPUs gave different weights
    (README, "Seed replicas"). Records the CPU model (``/proc/cpuinfo``, else ``platform.processor()``), its widest
    x86 vector extension, torch's intra-op threads, the GPU, and the versions of python, torch, CUDA, cuDNN, numpy
    and nnU-Net."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    info: Dict[str, str] = {}
    try:
        with open(cpuinfo) as f:
            for line in f:  # the first core's lines
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    cpu = info.get("model name") or platform.processor() or platform.machine()
    flags = set(info.get("flags", "").split())
    simd = next((f for f in ("avx512f", "avx2", "avx", "sse4_2") if f in flags), None)
    try:
        nnunet = version("nnunetv2")
    except PackageNotFoundError:
        nnunet = None
    cuda = device.type == "cuda" and torch.cuda.is_available()
    return {"cpu": cpu, "simd": simd, "torch_threads": torch.get_num_threads(), "os": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "nnunetv2": nnunet, "cuda": torch.version.cuda if cuda else None,
            "cudnn": torch.backends.cudnn.version() if cuda else None,
            "gpu": torch.cuda.get_device_name(device) if cuda else None}


class NondeterminismRecorder:
    """While installed, keeps each distinct warning that torch raises for an op without a deterministic kernel
    (``warn_only=True``), and still shows it once. Other warnings pass through untouched."""

    def __init__(self) -> None:
        self.messages: List[str] = []
        self._show = None
        self._filters = None

    def install(self) -> "NondeterminismRecorder":
        if self._show is not None:
            return self
        self._filters = warnings.filters[:]
        warnings.filterwarnings("always", message=f".*{NONDETERMINISTIC_ALERT.pattern}")
        self._show = warnings.showwarning

        def showwarning(message, category, filename, lineno, file=None, line=None):
            text = str(message)
            if NONDETERMINISTIC_ALERT.search(text):
                if text in self.messages:
                    return
                self.messages.append(text)
            self._show(message, category, filename, lineno, file, line)

        warnings.showwarning = showwarning
        return self

    def uninstall(self) -> None:
        if self._show is not None:
            warnings.showwarning = self._show
            warnings.filters[:] = self._filters
            self._show = None


class SeededWorkerLoader:
    """Wraps an nnU-Net data loader so that each augmentation worker seeds python, numpy and torch, and runs
    torch single-threaded.

    batchgenerators' producer seeds numpy only, then calls ``set_thread_id``; we seed all three there, and call
    ``torch.set_num_threads(1)`` first, as the producer of nnU-Net's own ``NonDetMultiThreadedAugmenter`` does:
    ``nnUNetv2_train -device cpu`` gives torch one thread per core, the workers are forked from that process, and a
    forked worker whose torch op uses the inherited OpenMP thread pool waits forever (it hung every time here).
    The wrapper lives in this importable module so that it pickles under any start method.
    """

    def __init__(self, loader, seed: int):
        self.loader = loader
        self.seed = seed

    def set_thread_id(self, thread_id: int) -> None:
        torch.set_num_threads(1)
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
def untimed_gaussian_blur() -> Iterator[None]:
    """While active, every ``GaussianBlurTransform`` built gets ``benchmark=False``: it always blurs by direct
    convolution instead of choosing direct or FFT convolution by timing both (batchgeneratorsv2's
    ``_benchmark_wrapper``), a choice that depends on the machine's load and changes the images' last bits."""
    from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform

    original = GaussianBlurTransform.__init__

    def untimed_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.benchmark = False

    GaussianBlurTransform.__init__ = untimed_init
    try:
        yield
    finally:
        GaussianBlurTransform.__init__ = original


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
