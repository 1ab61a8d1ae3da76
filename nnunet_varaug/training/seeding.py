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
from typing import Dict, Iterator, List, Mapping, MutableMapping, Optional, Tuple

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


def determinism_settings() -> Dict[str, object]:
    """The kernel-selection settings as torch reports them: deterministic algorithms (and warn-only), cuDNN
    deterministic and benchmark mode."""
    return {"deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
            "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark)}


def make_deterministic() -> Dict[str, object]:
    """Deterministic kernels: ``torch.use_deterministic_algorithms(True, warn_only=True)``, cuDNN deterministic
    and benchmark mode off (nnU-Net's ``run_training`` turns benchmark mode on, which picks kernels by timing).
    Returns the settings as torch reports them afterwards."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    return determinism_settings()


def allow_nondeterminism() -> Dict[str, object]:
    """What nnU-Net's own training leaves the GPU free to do: deterministic algorithms off, cuDNN
    non-deterministic with benchmark mode on (kernels chosen by timing). Returns the settings as torch reports
    them afterwards, as :func:`make_deterministic` does."""
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic = False
    torch.backends.cudnn.benchmark = True
    return determinism_settings()


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


STREAM_LAYOUT = 2
"""How a replica's batches are drawn, recorded as ``streams.layout`` in debug.json and checkpoints. 1 (records
without ``streams``): each augmentation worker (or, without workers, the training process) drew the batch's cases
and patch locations and its augmentation from one generator, interleaved. 2: they come from two separate streams
(:class:`SeededWorkerLoader`), so that a one-source replica can change one and keep the other."""


class RandomStream:
    """One stream of random numbers for python's ``random``, numpy's global generator and torch's CPU generator.

    While :meth:`active`, the three global generators hold the stream's states; afterwards the stream keeps where
    it got to and the globals are back as they were. Code that draws from the globals (nnU-Net's sampling,
    batchgeneratorsv2's transforms) thus draws from the stream, whatever else draws in between."""

    def __init__(self, seed: int = 0) -> None:
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        self.python = random.Random(seed).getstate()
        self.numpy = np.random.RandomState(seed).get_state()
        self.torch = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        torch.set_rng_state(self.torch)
        try:
            yield
        finally:
            self.python, self.numpy, self.torch = random.getstate(), np.random.get_state(), torch.get_rng_state()
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


class StreamedTransform:
    """A transform (batchgeneratorsv2's, called with the sample's arrays as keywords) run on a stream of its own."""

    def __init__(self, transform, stream: RandomStream) -> None:
        self.transform = transform
        self.stream = stream

    def __call__(self, **data):
        with self.stream.active():
            return self.transform(**data)


class SeededWorkerLoader:
    """Wraps an nnU-Net data loader: its batches are drawn from a sampling stream (which cases, which patch
    locations, foreground oversampling included) and every call of its transforms from an augmentation stream
    (:class:`RandomStream`); per worker thread ``t``, the streams are ``derive_seed(sampling, "sampling", seed, t)``
    and ``derive_seed(augmentation, "augmentation", seed, t)``. ``seed`` keys the run (replica, augmenter, epoch);
    ``sampling`` and ``augmentation`` are the stream indices, which a one-source replica changes one at a time.
    Without workers (nnU-Net's ``SingleThreadedAugmenter``) the loader runs as thread 0, in the training process.

    batchgenerators' producer seeds numpy only, then calls ``set_thread_id``; there we run torch single-threaded, as
    the producer of nnU-Net's own ``NonDetMultiThreadedAugmenter`` does (``nnUNetv2_train -device cpu`` gives torch
    one thread per core, the workers are forked from that process, and a forked worker whose torch op uses the
    inherited OpenMP thread pool waits forever), seed the worker's globals, and restart both streams for the thread.
    The wrapper lives in this importable module so that it pickles under any start method.
    """

    def __init__(self, loader, seed: int, sampling: int = 0, augmentation: int = 0):
        self.loader = loader
        self.seed = seed
        self.indices = (int(sampling), int(augmentation))
        self.thread_id = 0
        self.sampling, self.augmentation = RandomStream(), RandomStream()
        if getattr(loader, "transforms", None) is not None:  # nnU-Net >= 2.6 augments inside its loader
            loader.transforms = StreamedTransform(loader.transforms, self.augmentation)
        self.restart(seed)

    def restart(self, seed: int) -> None:
        """Both streams from the start again, keyed by ``seed`` (e.g. a new epoch's), for the current thread."""
        self.seed = seed
        self.sampling.reseed(derive_seed(self.indices[0], "sampling", seed, self.thread_id))
        self.augmentation.reseed(derive_seed(self.indices[1], "augmentation", seed, self.thread_id))

    def set_thread_id(self, thread_id: int) -> None:
        torch.set_num_threads(1)
        seed_everything(derive_seed(self.seed, thread_id))
        self.thread_id = thread_id
        self.restart(self.seed)
        self.loader.set_thread_id(thread_id)

    def __iter__(self):
        return self

    def __next__(self):
        with self.sampling.active():
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
def seeded_augmenters(seed: int, sampling: int = 0, augmentation: int = 0) -> Iterator[None]:
    """While active, nnU-Net's trainer builds order-deterministic augmenters over :class:`SeededWorkerLoader`.

    With workers, batchgenerators' ``MultiThreadedAugmenter`` (batches in a fixed order) replaces nnU-Net's
    ``NonDetMultiThreadedAugmenter``; without, nnU-Net's ``SingleThreadedAugmenter`` gets the wrapped loader. The
    first augmenter built is the training one, the second the validation one; each is keyed by
    ``derive_seed(seed, "augmenter", index)``. ``sampling`` and ``augmentation``: the stream indices.
    """
    from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as trainer_module

    built = []
    single_threaded = trainer_module.SingleThreadedAugmenter

    def streamed(data_loader, transform):
        stream = derive_seed(seed, "augmenter", len(built))
        built.append(stream)
        loader = SeededWorkerLoader(data_loader, stream, sampling, augmentation)
        return loader, None if transform is None else StreamedTransform(transform, loader.augmentation), stream

    def deterministic_augmenter(data_loader, transform, num_processes, num_cached=2, seeds=None,
                                pin_memory=False, wait_time=0.02, **_):
        loader, transform, stream = streamed(data_loader, transform)
        per_queue = max(2, num_cached // max(1, num_processes))
        return MultiThreadedAugmenter(loader, transform, num_processes, num_cached_per_queue=per_queue,
                                      seeds=[derive_seed(stream, i) for i in range(num_processes)],
                                      pin_memory=pin_memory, wait_time=wait_time)

    def single_threaded_augmenter(data_loader, transform):
        loader, transform, _ = streamed(data_loader, transform)
        return single_threaded(loader, transform)

    original = trainer_module.NonDetMultiThreadedAugmenter
    trainer_module.NonDetMultiThreadedAugmenter = deterministic_augmenter
    trainer_module.SingleThreadedAugmenter = single_threaded_augmenter
    try:
        yield
    finally:
        trainer_module.NonDetMultiThreadedAugmenter = original
        trainer_module.SingleThreadedAugmenter = single_threaded


def restart_streams(augmenter, seed: int) -> bool:
    """Restart the sampling and augmentation streams of an augmenter built under :func:`seeded_augmenters`, keyed by
    ``seed`` (e.g. ``derive_seed(K, "augmenter", index, "epoch", e)``, so that a run continued at epoch e draws
    what an uninterrupted one draws from e on). A ``MultiThreadedAugmenter``'s workers restart (the batches they
    had prepared are dropped); a ``SingleThreadedAugmenter``'s loader restarts in place. Returns False, doing
    nothing, for any other augmenter."""
    loader = getattr(augmenter, "generator", None) or getattr(augmenter, "data_loader", None)
    if not isinstance(loader, SeededWorkerLoader):
        return False
    if hasattr(augmenter, "restart"):
        loader.seed = seed
        augmenter.seeds = [derive_seed(seed, i) for i in range(augmenter.num_processes)]
        augmenter.restart()
    else:
        loader.restart(seed)
    return True


def record_layout(record: Optional[Mapping]) -> Optional[int]:
    """The stream layout of a replica's ``nnunet_varaug`` record (debug.json or checkpoint): ``streams.layout``;
    1 for a seed or numerical replica recorded before layouts were (it has ``determinism``, ``seed``, ``mca`` or
    ``ieee`` but no ``streams``); None for anything else (no record, a trainer that seeds nothing)."""
    if not isinstance(record, Mapping):
        return None
    streams = record.get("streams")
    if isinstance(streams, Mapping) and "layout" in streams:
        return int(streams["layout"])
    return 1 if any(k in record for k in ("determinism", "seed", "mca", "ieee")) else None


def layout_warning(records: Mapping[str, Optional[Mapping]]) -> Optional[str]:
    """A warning when the replicas compared were trained with different stream layouts, else None.

    Args:
        records: replica name -> its ``nnunet_varaug`` record (``debug.json["nnunet_varaug"]`` or the
            checkpoint's), or None when it has none; those, and records without a layout, are left out.
    """
    groups: Dict[int, List[str]] = {}
    for name, record in records.items():
        layout = record_layout(record)
        if layout is not None:
            groups.setdefault(layout, []).append(name)
    if len(groups) < 2:
        return None
    described = "; ".join(f"layout {layout}: {', '.join(names)}" for layout, names in sorted(groups.items()))
    old = ", ".join(n for layout, names in sorted(groups.items()) if layout != max(groups) for n in names)
    return (f"the replicas compared were trained with different random-stream layouts ({described}). Since layout "
            f"2 a replica draws its batches' cases and patch locations and their augmentation from separate streams, "
            f"so a replica trained before draws other batches than the same name trained now, and a one-source "
            f"replica (_init, _order, _aug) differs from _seed0 in its source alone only if both share a layout. "
            f"Train {old} again with this version (move their fold folders away, then rerun the command that "
            f"trained them)")
