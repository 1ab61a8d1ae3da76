"""The compiled CPU kernels of stochastic rounding (the one job of this module: build, load and call them).

The C source (:mod:`.csource`) is compiled once per machine with the system C compiler (``$CC``, else ``cc`` or
``gcc``) into ``$NNUNET_VARAUG_KERNEL_DIR`` (default ``~/.cache/nnunet_varaug/kernels``) and loaded with
:mod:`ctypes`. Without a compiler everything still works with the PyTorch reference code, which gives the same
bits more slowly; a message says once what is missing. ``NNUNET_VARAUG_KERNELS=torch`` forces the reference
code (the tests use it to compare the two). Work is split into fixed chunks run on ``torch.get_num_threads()``
threads; every value's noise depends on its address only, so results do not depend on the thread count.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, List, Optional, Sequence

import torch

from nnunet_varaug.training.numerics.csource import SOURCE

_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared"]
_lock = threading.Lock()
_state = {"lib": None, "tried": False, "message": "", "threads": None}
_pools = {}

#: Elements per chunk of parallel work (fixed, so the split never depends on the thread count).
CHUNK = 1 << 16


def _compiler() -> Optional[str]:
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


def _machine_tag() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = []
    return "".join(lines) + sys.platform


def _build() -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set $CC, or install gcc or clang)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    tag = hashlib.sha256((SOURCE + " ".join(_FLAGS) + version + _machine_tag()).encode()).hexdigest()[:16]
    folder = os.environ.get("NNUNET_VARAUG_KERNEL_DIR",
                            os.path.join(os.path.expanduser("~"), ".cache", "nnunet_varaug", "kernels"))
    path = os.path.join(folder, f"numerics_{tag}.so")
    if not os.path.isfile(path):
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            src = os.path.join(tmp, "numerics.c")
            with open(src, "w") as f:
                f.write(SOURCE)
            out = os.path.join(tmp, "numerics.so")
            proc = subprocess.run([cc, *_FLAGS, src, "-o", out, "-lm"], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[:500]}")
            os.replace(out, path)  # atomic: concurrent builders each install a complete file
    return ctypes.CDLL(path)


def library() -> Optional[ctypes.CDLL]:
    """The loaded kernels, or None (reference PyTorch code is used; :func:`status` says why)."""
    if _state["tried"]:
        return _state["lib"]
    with _lock:
        if not _state["tried"]:
            if os.environ.get("NNUNET_VARAUG_KERNELS", "").lower() == "torch":
                _state["message"] = "NNUNET_VARAUG_KERNELS=torch: the PyTorch reference kernels are used"
            else:
                try:
                    _state["lib"] = _build()
                    _state["message"] = "compiled kernels in use"
                except (OSError, RuntimeError) as e:
                    _state["message"] = (f"nnunet_varaug: the compiled stochastic-rounding kernels are unavailable "
                                         f"({e}); the PyTorch reference kernels give the same results, several "
                                         f"times slower. Install a C compiler (e.g. `apt install gcc`) for speed.")
                    print(_state["message"], file=sys.stderr)
            _state["tried"] = True
    return _state["lib"]


def status() -> str:
    library()
    return _state["message"]


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the compiled kernels apply: loaded, and every tensor on the CPU."""
    return library() is not None and all(t.device.type == "cpu" for t in tensors)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run PyTorch's (and MKL's) kernels on one thread inside: their float64 reductions then add in one fixed
    order, so a result does not depend on the thread count (PyTorch's parallel sums split differently)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    _state["threads"] = threads  # the compiled kernels keep the caller's threads
    try:
        yield
    finally:
        _state["threads"] = None
        torch.set_num_threads(threads)


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def run_chunks(n: int, work: Callable[[int, int], None], chunk: int = CHUNK) -> None:
    """Call ``work(start, stop)`` over [0, n) in fixed chunks, on torch's thread count (ctypes frees the GIL)."""
    starts = list(range(0, n, chunk))
    threads = _state.get("threads") or torch.get_num_threads()
    if threads <= 1 or len(starts) <= 1:
        for s in starts:
            work(s, min(n, s + chunk))
        return
    pool = _pools.get(threads)
    if pool is None:
        pool = _pools[threads] = ThreadPoolExecutor(threads)
    list(pool.map(lambda s: work(s, min(n, s + chunk)), starts))


def noise_args(key: Sequence[int], op: int, iteration: int, directed: int) -> List:
    return [ctypes.c_uint32(key[0]), ctypes.c_uint32(key[1]), ctypes.c_uint32(op), ctypes.c_uint32(iteration),
            ctypes.c_int(directed)]


def words(key, op: int, iteration: int, directed: int, base: int, n: int, per: int) -> torch.Tensor:
    """The random words of roundings ``base .. base + n - 1`` (int64 (n, per)), from the compiled Philox."""
    lib = library()
    out = torch.empty(n * per, dtype=torch.int32)
    lib.nv_words(*noise_args(key, op, iteration, directed), ctypes.c_uint64(base), ctypes.c_int64(n),
                 ctypes.c_int(per), _ptr(out))
    return out.view(-1, per).to(torch.int64) & 0xFFFFFFFF


def round_f32(high: torch.Tensor, t: int, key, op: int, iteration: int, directed: int, base: int) -> torch.Tensor:
    """float64 ``high`` rounded to float32 (SR at t = 24, else random rounding at t), addresses from ``base``."""
    x = high.contiguous()
    y = torch.empty(x.shape, dtype=torch.float32)
    lib = library()
    args = noise_args(key, op, iteration, directed)
    xp, yp = x.data_ptr(), y.data_ptr()

    def work(start: int, stop: int) -> None:
        lib.nv_round_f32(ctypes.c_void_p(xp + 8 * start), ctypes.c_void_p(yp + 4 * start),
                         ctypes.c_int64(stop - start), ctypes.c_int(t), *args[:4], args[4],
                         ctypes.c_uint64(base + start))

    run_chunks(x.numel(), work)
    return y
