"""Convolutions, matrix products and sums for the dispatch mode (the one job of this module): computed either
in float64 and rounded once (op level) or as a fixed sequence of stochastically rounded multiplies and adds
(instruction level).

**Op level** (``conv_forward_high``, ``conv_backward_high``): a convolution is the sum over kernel offsets of
one float64 matrix product per offset (``W[:, :, offset] @ x_shifted``), accumulated in float64. Every product
of two float32 numbers is exact in float64; the sums are float64 additions (error below ``2^-53`` relative per
addition). It was the cheapest such route measured on the CPU here (3.8-13x a float32 oneDNN convolution,
depending on load, against 7-20x for PyTorch's float64 convolution; docs/numerics.md).

**Instruction level** (:func:`sr_matmul`, :func:`sr_sum`, ``conv_*_instr``): every product ``a_i * b_i`` and
every addition is one stochastically rounded float32 instruction. The accumulation order emulated is that of a
SIMD/BLAS kernel with ``L`` lanes: term ``i`` (of K) goes to lane ``i mod L``; each lane adds its terms in
order, rounding after every addition (its first term starts it, unrounded); the lanes are then summed as a
halving tree (lane j + lane j + L/2, until one is left), rounding after every addition. ``L`` is 8 for
``K <= 2048`` (an AVX2 register of float32), else the smallest power of two with ``K / L <= 256`` (partial
sums over blocks of K, as a threaded BLAS does). Missing terms (K not a multiple of L) are exact zeros, whose
addition is exact. A convolution is its im2col matrix product, with terms ordered (input channel, kernel
offsets) as ``weight.reshape(C_out, -1)``; its input gradient adds the overlapping im2col contributions one
kernel offset after the other, each addition rounded.
"""
from __future__ import annotations

import itertools
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

Rounder = Callable[[torch.Tensor], torch.Tensor]  # float64 result -> float32, stochastically rounded

#: Elements of float64 scratch per lane step (chunks over the output so memory stays bounded).
_CHUNK = 1 << 16


def lanes_for(k: int) -> int:
    """The number of accumulation lanes L for a K-term reduction (module docstring)."""
    if k <= 2048:
        return 8
    lanes = 8
    while -(-k // lanes) > 256:
        lanes *= 2
    return lanes


# ---- geometry --------------------------------------------------------------------------------------------------
def _out_size(size: int, k: int, stride: int, pad: int, dil: int) -> int:
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


def _shifted(xp: torch.Tensor, offset: Sequence[int], out: Sequence[int], stride, dilation) -> torch.Tensor:
    """The view of padded input ``xp`` (N, C, *S) that kernel ``offset`` multiplies: (N, C, *out)."""
    index = [slice(None), slice(None)]
    for o, n, s, d in zip(offset, out, stride, dilation):
        index.append(slice(o * d, o * d + (n - 1) * s + 1, s))
    return xp[tuple(index)]


def _geometry(x: torch.Tensor, w: torch.Tensor, stride, padding, dilation):
    dims = x.dim() - 2
    stride, padding, dilation = ([int(v) for v in (a if len(a) == dims else list(a) * dims)]
                                 for a in (stride, padding, dilation))
    out = [_out_size(x.shape[2 + i], w.shape[2 + i], stride[i], padding[i], dilation[i]) for i in range(dims)]
    offsets = list(itertools.product(*(range(k) for k in w.shape[2:])))
    pad = [p for p in reversed(padding) for _ in (0, 1)]
    return stride, padding, dilation, out, offsets, pad


def conv_supported(x: torch.Tensor, w: torch.Tensor, transposed: bool, groups: int) -> bool:
    """Whether the routes here handle this convolution (else the caller computes it in float64 as one op)."""
    return (not transposed) and groups == 1 and x.dim() in (4, 5) and w.dim() == x.dim() and x.layout == torch.strided


# ---- op level: float64 accumulation, rounded once by the caller ------------------------------------------------
def conv_forward_high(x, w, bias, stride, padding, dilation) -> torch.Tensor:
    """The float64 convolution of float32 ``x`` (N, Cin, *S) and ``w`` (Cout, Cin, *K), one GEMM per offset."""
    stride, padding, dilation, out, offsets, pad = _geometry(x, w, stride, padding, dilation)
    n, cout = x.shape[0], w.shape[0]
    xp = F.pad(x.double(), pad) if any(padding) else x.double()
    wd = w.double().reshape(cout, w.shape[1], -1)
    result = torch.zeros((n, cout, int(torch.tensor(out).prod())), dtype=torch.float64, device=x.device)
    for j, offset in enumerate(offsets):
        cols = _shifted(xp, offset, out, stride, dilation).reshape(n, x.shape[1], -1)
        result.baddbmm_(wd[:, :, j].expand(n, -1, -1), cols)
    if bias is not None:
        result.add_(bias.double().view(1, -1, 1))
    return result.view(n, cout, *out)


def conv_backward_high(grad, x, w, stride, padding, dilation, mask) -> Tuple[Optional[torch.Tensor], ...]:
    """float64 (grad_input, grad_weight, grad_bias) of :func:`conv_forward_high`, per ``mask``."""
    stride, padding, dilation, out, offsets, pad = _geometry(x, w, stride, padding, dilation)
    n, cin, cout = x.shape[0], x.shape[1], w.shape[0]
    g = grad.double().reshape(n, cout, -1)
    gi = gw = gb = None
    if mask[0]:
        wd = w.double().reshape(cout, cin, -1)
        gip = torch.zeros((n, cin, *(s + 2 * p for s, p in zip(x.shape[2:], padding))), dtype=torch.float64,
                          device=x.device)
        for j, offset in enumerate(offsets):
            contribution = torch.matmul(wd[:, :, j].t(), g).view(n, cin, *out)
            _shifted(gip, offset, out, stride, dilation).add_(contribution)
        gi = gip[(slice(None), slice(None)) + tuple(slice(p, p + s) for p, s in zip(padding, x.shape[2:]))]
    if mask[1]:
        xp = F.pad(x.double(), pad) if any(padding) else x.double()
        gflat = g.transpose(0, 1).reshape(cout, -1)
        gw = torch.empty((cout, cin, len(offsets)), dtype=torch.float64, device=x.device)
        for j, offset in enumerate(offsets):
            cols = _shifted(xp, offset, out, stride, dilation).transpose(0, 1).reshape(cin, -1)
            gw[:, :, j] = gflat @ cols.t()
        gw = gw.view(w.shape)
    if mask[2]:
        gb = g.sum(dim=(0, 2))
    return gi, gw, gb


# ---- instruction level -----------------------------------------------------------------------------------------
def _lane_reduce(terms: Callable[[int], torch.Tensor], steps: int, rnd: Rounder) -> torch.Tensor:
    """Accumulate ``terms(i)`` (each (L, ...) float32, lane first) for i < steps, lane-wise then as a tree."""
    acc = terms(0)
    for i in range(1, steps):
        acc = rnd(acc.double().add_(terms(i).double()))
    while acc.shape[0] > 1:
        half = acc.shape[0] // 2
        acc = rnd(acc[:half].double().add_(acc[half:].double()))
    return acc[0]


def sr_matmul(a: torch.Tensor, b: torch.Tensor, rnd: Rounder) -> torch.Tensor:
    """``a @ b`` (float32 (M, K) @ (K, N)) with every multiply and add stochastically rounded (lane order)."""
    m, k = a.shape
    n = b.shape[1]
    lanes = lanes_for(k)
    steps = -(-k // lanes)
    if steps * lanes != k:
        a = F.pad(a, (0, steps * lanes - k))
        b = F.pad(b, (0, 0, 0, steps * lanes - k))
    chunk = max(1, _CHUNK // max(1, lanes * m))
    parts = []
    for start in range(0, n, chunk):
        bc = b[:, start:start + chunk]

        def terms(i: int, bc=bc) -> torch.Tensor:
            block = slice(i * lanes, (i + 1) * lanes)
            return rnd(a[:, block].t().double().unsqueeze(2) * bc[block].double().unsqueeze(1))  # (L, M, n)

        parts.append(_lane_reduce(terms, steps, rnd))
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def sr_sum(x: torch.Tensor, dims: Optional[Sequence[int]], keepdim: bool, rnd: Rounder) -> torch.Tensor:
    """``x.sum(dims)`` with every addition stochastically rounded (lane order over the flattened reduced dims)."""
    dims = list(range(x.dim())) if not dims else sorted(d % x.dim() for d in dims)
    kept = [d for d in range(x.dim()) if d not in dims]
    k = 1
    for d in dims:
        k *= x.shape[d]
    flat = x.permute(*kept, *dims).reshape(-1, k)
    lanes = lanes_for(k)
    steps = -(-k // lanes)
    if steps * lanes != k:
        flat = F.pad(flat, (0, steps * lanes - k))
    blocks = flat.view(-1, steps, lanes)
    result = _lane_reduce(lambda i: blocks[:, i].t(), steps, rnd)
    shape = [x.shape[d] for d in kept]
    if keepdim:
        shape = [1 if d in dims else x.shape[d] for d in range(x.dim())]
    return result.reshape(shape)


def _im2col(x, w, stride, padding, dilation):
    stride, padding, dilation, out, offsets, pad = _geometry(x, w, stride, padding, dilation)
    xp = F.pad(x, pad) if any(padding) else x
    cols = torch.stack([_shifted(xp, o, out, stride, dilation) for o in offsets], dim=2)  # N, Cin, O, *out
    n, cin = x.shape[:2]
    return cols.permute(1, 2, 0, *range(3, cols.dim())).reshape(cin * len(offsets), -1), out  # (K, N*P)


def conv_forward_instr(x, w, bias, stride, padding, dilation, rnd: Rounder) -> torch.Tensor:
    """float32 convolution with per-instruction stochastic rounding (im2col product, then the bias added)."""
    cols, out = _im2col(x, w, stride, padding, dilation)
    n, cout = x.shape[0], w.shape[0]
    y = sr_matmul(w.reshape(cout, -1), cols, rnd)  # (Cout, N*P)
    if bias is not None:
        y = rnd(y.double().add_(bias.double().view(-1, 1)))
    return y.view(cout, n, *out).transpose(0, 1).contiguous()


def conv_backward_instr(grad, x, w, stride, padding, dilation, mask, rnd: Rounder):
    """(grad_input, grad_weight, grad_bias) of :func:`conv_forward_instr`, every multiply and add rounded."""
    stride_, padding_, dilation_, out, offsets, pad = _geometry(x, w, stride, padding, dilation)
    n, cin, cout = x.shape[0], x.shape[1], w.shape[0]
    g = grad.transpose(0, 1).reshape(cout, -1)  # (Cout, N*P)
    gi = gw = gb = None
    if mask[0]:
        gcols = sr_matmul(w.reshape(cout, -1).t(), g, rnd).view(cin, len(offsets), n, *out)
        gip = torch.zeros((n, cin, *(s + 2 * p for s, p in zip(x.shape[2:], padding_))), dtype=x.dtype,
                          device=x.device)
        for j, offset in enumerate(offsets):
            view = _shifted(gip, offset, out, stride_, dilation_)
            view.copy_(rnd(view.double().add_(gcols[:, j].transpose(0, 1).double())))
        gi = gip[(slice(None), slice(None)) + tuple(slice(p, p + s) for p, s in zip(padding_, x.shape[2:]))]
        gi = gi.contiguous()
    if mask[1]:
        cols, _ = _im2col(x, w, stride, padding, dilation)
        gw = sr_matmul(g, cols.t(), rnd).view(w.shape)
    if mask[2]:
        gb = sr_sum(g, [1], False, rnd)
    return gi, gw, gb
