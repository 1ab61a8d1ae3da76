"""Per-instruction dot products and sums in a fixed lane order (the one job of this module).

Every product ``a_i * b_i`` and every addition is one stochastically rounded float32 instruction (its exact
float64 value rounded by the :class:`.rounder.Rounder`). The order emulated is that of a SIMD/BLAS kernel with L
lanes: term i (of K) goes to lane ``i mod L``; each lane adds its terms in order, rounding after every addition
(its first term starts it, unrounded); the lanes are then summed as a halving tree (lane j + lane j + L/2, until
one is left), rounding after every addition. L is 8 for K <= 2048 (an AVX2 register of float32), else the
smallest power of two with K / L <= 256 (partial sums over blocks of K, as a threaded BLAS does). Missing terms
(K not a multiple of L) are exact zeros, whose products and additions are exact.

Noise addresses, per output o of a section starting at ``base`` (S = ceil(K / L) steps):

* dot product (``I = 2 S L`` addresses per output): product of term i at ``i``; the addition of term
  ``s L + l`` (s >= 1) to lane l at ``S L + (s - 1) L + l``; tree additions of level ``half`` at
  ``S L + (S - 1) L + (L - 2 half) + j``;
* sum (``I = S L`` per output): the same without the products (additions at ``(s - 1) L + l``, tree at
  ``(S - 1) L + (L - 2 half) + j``).

:func:`sr_dot` and :func:`sr_sum` run the compiled kernels on the CPU and the PyTorch reference elsewhere (or
without a compiler); both give the same bits.
"""
from __future__ import annotations

import ctypes
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from nnunet_varaug.training.numerics import kernels
from nnunet_varaug.training.numerics.rounder import Rounder

F32 = torch.float32
#: Elements of float64 scratch per lane step in the reference code (chunks over the outputs).
_CHUNK = 1 << 16


def lanes_for(k: int) -> int:
    """The number of accumulation lanes L for a K-term reduction (module docstring)."""
    if k <= 2048:
        return 8
    lanes = 8
    while -(-k // lanes) > 256:
        lanes *= 2
    return lanes


def _tree(acc: torch.Tensor, rounder: Rounder, at: torch.Tensor) -> torch.Tensor:
    """Halving tree over the lanes (dim 0); ``at``: addresses of the tree's first addition per output."""
    lanes = acc.shape[0]
    while acc.shape[0] > 1:
        half = acc.shape[0] // 2
        j = torch.arange(half, device=acc.device).view(-1, *([1] * (acc.dim() - 1)))
        acc = rounder.round_at(acc[:half].double() + acc[half:].double(), F32, at + (lanes - 2 * half) + j)
    return acc[0]


def sr_dot(a: torch.Tensor, b: torch.Tensor, rounder: Rounder) -> torch.Tensor:
    """``out[i, j] = sum_k a[i, k] b[j, k]`` (float32 (M, K) and (N, K)), every instruction rounded: (M, N)."""
    m, k = a.shape
    n = b.shape[0]
    lanes = lanes_for(k)
    steps = -(-k // lanes)
    per_output = 2 * steps * lanes
    base = rounder.reserve(m * n * per_output)
    rounder.elements += m * n * max(0, 2 * k - 1)
    a, b = a.contiguous(), b.contiguous()
    if kernels.usable(a, b) and k > 0:
        return _dot_compiled(a, b, rounder, lanes, steps, base)
    sl = steps * lanes
    if sl != k:
        a, b = F.pad(a, (0, sl - k)), F.pad(b, (0, sl - k))
    lane = torch.arange(lanes, device=a.device).view(-1, 1, 1)
    chunk = max(1, _CHUNK // max(1, lanes * m))
    parts = []
    for j0 in range(0, n, chunk):
        bc = b[j0:j0 + chunk]
        nc = bc.shape[0]
        out_base = base + (torch.arange(m, device=a.device).view(-1, 1) * n
                           + torch.arange(j0, j0 + nc, device=a.device).view(1, -1)) * per_output

        def product(s: int) -> torch.Tensor:
            block = slice(s * lanes, (s + 1) * lanes)
            high = a[:, block].t().double().unsqueeze(2) * bc[:, block].t().double().unsqueeze(1)  # (L, m, nc)
            return rounder.round_at(high, F32, out_base + s * lanes + lane)

        acc = product(0)
        for s in range(1, steps):
            acc = rounder.round_at(acc.double() + product(s).double(), F32, out_base + sl + (s - 1) * lanes + lane)
        parts.append(_tree(acc, rounder, out_base + sl + (steps - 1) * lanes))
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def _kernel_call(rounder: Rounder):
    """What every compiled kernel call takes besides the data: the library, the rounder's noise arguments and the
    float32 rounding's type code."""
    key, op, iteration, directed = rounder.kernel_noise()
    lib = kernels.library()
    args = kernels.noise_args(key, op, iteration, directed)
    return lib, args, rounder.t(F32)


def _dot_compiled(a, b, rounder: Rounder, lanes: int, steps: int, base: int) -> torch.Tensor:
    m, k = a.shape
    n = b.shape[0]
    out = torch.empty((m, n), dtype=F32)
    lib, args, t = _kernel_call(rounder)

    def work(j0: int, j1: int) -> None:
        lib.nv_sr_dot(ctypes.c_void_p(a.data_ptr()), ctypes.c_int64(k), ctypes.c_void_p(b.data_ptr()),
                      ctypes.c_int64(k), ctypes.c_void_p(out.data_ptr()), ctypes.c_int64(m), ctypes.c_int64(n),
                      ctypes.c_int64(j0), ctypes.c_int64(j1), ctypes.c_int64(k), ctypes.c_int(lanes),
                      ctypes.c_int64(steps), ctypes.c_int(t), *args, ctypes.c_uint64(base))

    kernels.run_chunks(n, work, chunk=max(1, (1 << 18) // max(1, m * k)))
    return out


def sr_dot_rows(a: torch.Tensor, b: torch.Tensor, rounder: Rounder) -> torch.Tensor:
    """``out[r] = sum_k a[r, k] b[r, k]`` (float32 (R, K) each), every instruction rounded: (R,)."""
    r, k = a.shape
    lanes = lanes_for(k)
    steps = -(-k // lanes)
    per_output = 2 * steps * lanes
    base = rounder.reserve(r * per_output)
    rounder.elements += r * max(0, 2 * k - 1)
    a, b = a.contiguous(), b.contiguous()
    if kernels.usable(a, b) and k > 0:
        out = torch.empty(r, dtype=F32)
        lib, args, t = _kernel_call(rounder)

        def work(r0: int, r1: int) -> None:
            lib.nv_sr_rowdot(ctypes.c_void_p(a.data_ptr()), ctypes.c_void_p(b.data_ptr()), ctypes.c_int64(k),
                             ctypes.c_void_p(out.data_ptr()), ctypes.c_int64(r0), ctypes.c_int64(r1),
                             ctypes.c_int64(k), ctypes.c_int(lanes), ctypes.c_int64(steps), ctypes.c_int(t), *args,
                             ctypes.c_uint64(base))

        kernels.run_chunks(r, work, chunk=max(1, (1 << 16) // max(1, k)))
        return out
    sl = steps * lanes
    if sl != k:
        a, b = F.pad(a, (0, sl - k)), F.pad(b, (0, sl - k))
    lane = torch.arange(lanes, device=a.device).view(-1, 1)
    out_base = base + torch.arange(r, device=a.device).view(1, -1) * per_output

    def product(s: int) -> torch.Tensor:
        block = slice(s * lanes, (s + 1) * lanes)
        return rounder.round_at(a[:, block].t().double() * b[:, block].t().double(), F32, out_base + s * lanes + lane)

    acc = product(0)
    for s in range(1, steps):
        acc = rounder.round_at(acc.double() + product(s).double(), F32, out_base + sl + (s - 1) * lanes + lane)
    return _tree(acc, rounder, out_base + sl + (steps - 1) * lanes)


def sr_sum_rows(x: torch.Tensor, rounder: Rounder) -> torch.Tensor:
    """``x.sum(1)`` of float32 (R, K), every addition rounded: (R,)."""
    r, k = x.shape
    lanes = lanes_for(k)
    steps = -(-k // lanes)
    per_output = steps * lanes
    base = rounder.reserve(r * per_output)
    rounder.elements += r * max(0, k - 1)
    x = x.contiguous()
    if kernels.usable(x) and k > 0:
        out = torch.empty(r, dtype=F32)
        lib, args, t = _kernel_call(rounder)

        def work(r0: int, r1: int) -> None:
            lib.nv_sr_sum(ctypes.c_void_p(x.data_ptr()), ctypes.c_int64(k), ctypes.c_void_p(out.data_ptr()),
                          ctypes.c_int64(r0), ctypes.c_int64(r1), ctypes.c_int64(k), ctypes.c_int(lanes),
                          ctypes.c_int64(steps), ctypes.c_int(t), *args, ctypes.c_uint64(base))

        kernels.run_chunks(r, work, chunk=max(1, (1 << 16) // max(1, k)))
        return out
    sl = steps * lanes
    if sl != k:
        x = F.pad(x, (0, sl - k))
    blocks = x.view(r, steps, lanes)
    lane = torch.arange(lanes, device=x.device).view(-1, 1)
    out_base = base + torch.arange(r, device=x.device).view(1, -1) * per_output
    acc = blocks[:, 0].t()
    for s in range(1, steps):
        acc = rounder.round_at(acc.double() + blocks[:, s].t().double(), F32, out_base + (s - 1) * lanes + lane)
    return _tree(acc, rounder, out_base + (steps - 1) * lanes)


def sr_sum(x: torch.Tensor, dims: Optional[Sequence[int]], keepdim: bool, rounder: Rounder) -> torch.Tensor:
    """``x.sum(dims, keepdim)`` with every addition rounded (lane order over the flattened reduced dims)."""
    dims = list(range(x.dim())) if not dims else sorted(d % x.dim() for d in dims)
    kept = [d for d in range(x.dim()) if d not in dims]
    k = 1
    for d in dims:
        k *= x.shape[d]
    flat = x.permute(*kept, *dims).reshape(-1, k)
    result = sr_sum_rows(flat, rounder)
    shape = [x.shape[d] for d in kept]
    if keepdim:
        shape = [1 if d in dims else x.shape[d] for d in range(x.dim())]
    return result.reshape(shape)


def sr_matmul(a: torch.Tensor, b: torch.Tensor, rounder: Rounder) -> torch.Tensor:
    """``a @ b`` (float32 (M, K) @ (K, N)) with every multiply and add rounded (lane order): (M, N)."""
    return sr_dot(a, b.t(), rounder)
