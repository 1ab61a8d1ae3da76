"""The shifted-GEMM route of the op-level (float64) convolutions (the one job of this module): forward, input
gradient and weight gradient of a convolution of Y (N, Ci, *S) with W (Co, Ci, *k), any stride and dilation.

The padded input is split into its ``prod(stride)`` phases (``Y[..., r0::s0, r1::s1, ...]``), each flattened to
(Ci, N * Q) with Q the phase grid (``ceil(padded / stride)`` per axis; one copy of the input in all). Kernel offset
o reads phase ``(o * d) mod s`` at the flat shift of ``(o * d) div s``, so the output at flat position p is
``sum_o W_o @ phase_o[:, p + shift_o]``: one matrix product of a shifted view per offset, no im2col copy.
Outputs whose window leaves the sample are computed on the grid and discarded. The positions are processed in
blocks of :data:`FLAT_BLOCK`, every offset applied to one block before the next, so that the block stays in cache.
Products of float32 values are exact in float64; the sums err below 2^-53 relative per addition; the caller rounds.
"""
from __future__ import annotations

import itertools
from typing import List, Tuple

import torch
import torch.nn.functional as F

#: Flat positions per block (4096 measured best of 1024-8192 on 32-64 channels, one thread; docs/performance.md).
FLAT_BLOCK = 4096
#: The route is taken when the phase grids hold at most this many times the output positions.
GRID_OVERHEAD = 1.5


class Flat:
    """The phase grids of a convolution ``geo`` (a :class:`.conv.Geometry`) of ``n`` samples, and each kernel
    offset's phase and flat shift."""

    def __init__(self, geo, n: int):
        self.geo, self.n = geo, n
        self.padded = [s + 2 * p for s, p in zip(geo.size, geo.padding)]
        self.grid_size = [-(-p // s) for p, s in zip(self.padded, geo.stride)]
        steps = [1] * len(self.grid_size)
        for i in range(len(self.grid_size) - 2, -1, -1):
            steps[i] = steps[i + 1] * self.grid_size[i + 1]
        phase_ids = {r: i for i, r in enumerate(itertools.product(*(range(s) for s in geo.stride)))}
        self.count = len(phase_ids)
        self.phases = [phase_ids[tuple(o * d % s for o, d, s in zip(off, geo.dilation, geo.stride))]
                       for off in geo.offsets]
        self.shifts = [sum((o * d // s) * st for o, d, s, st in zip(off, geo.dilation, geo.stride, steps))
                       for off in geo.offsets]
        self.total = n
        for q in self.grid_size:
            self.total *= q
        self.length = self.total - max(self.shifts)

    def blocks(self, device: torch.device) -> List[Tuple[int, int]]:
        """The flat positions [0, length) in blocks of :data:`FLAT_BLOCK` on the CPU (cache blocking); one block
        on a GPU, where each block's GEMMs would be kernel launches too small to fill it."""
        size = FLAT_BLOCK if device.type == "cpu" else max(1, self.length)
        return [(a, min(self.length, a + size)) for a in range(0, self.length, size)]

    def _split(self, xp: torch.Tensor) -> torch.Tensor:
        """(N, C, *padded) -> (R, C, N * Q): the phases, flattened (one copy)."""
        n, c, dims = xp.shape[0], xp.shape[1], len(self.grid_size)
        extra = [q * s - p for q, s, p in zip(self.grid_size, self.geo.stride, self.padded)]
        if any(extra):
            xp = F.pad(xp, [v for e in reversed(extra) for v in (0, e)])
        view = xp.reshape(n, c, *(v for q, s in zip(self.grid_size, self.geo.stride) for v in (q, s)))
        order = [3 + 2 * i for i in range(dims)] + [1, 0] + [2 + 2 * i for i in range(dims)]
        return view.permute(*order).reshape(-1, c, self.total)

    def split(self, y: torch.Tensor) -> torch.Tensor:
        """Y (N, C, *S) -> its padded phases (R, C, N * Q) float64."""
        return self._split(self.geo.padded(y.double()))

    def merge(self, phases: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`split` for a gradient: (R, C, N * Q) -> (N, C, *S), padding dropped."""
        dims, c = len(self.grid_size), phases.shape[1]
        view = phases.view(*self.geo.stride, c, self.n, *self.grid_size)
        order = [dims + 1, dims] + [v for i in range(dims) for v in (dims + 2 + i, i)]
        full = view.permute(*order).reshape(self.n, c, *(q * s for q, s in zip(self.grid_size, self.geo.stride)))
        return self.geo.unpadded(full[(slice(None), slice(None)) + tuple(slice(0, p) for p in self.padded)])

    def grid(self, g: torch.Tensor) -> torch.Tensor:
        """An output-shaped (N, C, *out) tensor on the phase grid, zeros elsewhere: (C, N * Q) float64."""
        out = torch.zeros((g.shape[1], self.n, *self.grid_size), dtype=torch.float64, device=g.device)
        out[(slice(None), slice(None)) + tuple(slice(0, o) for o in self.geo.out)] = g.transpose(0, 1)
        return out.view(g.shape[1], -1)

    def outputs(self, flat: torch.Tensor) -> torch.Tensor:
        """(C, N * Q) -> the valid outputs (N, C, *out)."""
        c = flat.shape[0]
        view = flat.view(c, self.n, *self.grid_size)[(slice(None), slice(None)) +
                                                     tuple(slice(0, o) for o in self.geo.out)]
        return view.transpose(0, 1)


def pays(geo) -> bool:
    """Whether the phase grids hold at most :data:`GRID_OVERHEAD` times the output positions."""
    grid = 1
    for size, pad, st in zip(geo.size, geo.padding, geo.stride):
        grid *= -(-(size + 2 * pad) // st)
    return grid <= GRID_OVERHEAD * geo.positions


def per_offset(w: torch.Tensor) -> torch.Tensor:
    """W (Co, Ci, *k) as float64 (O, Co, Ci), one contiguous matrix per kernel offset."""
    return w.double().reshape(w.shape[0], w.shape[1], -1).permute(2, 0, 1).contiguous()


def forward(y: torch.Tensor, w: torch.Tensor, geo) -> torch.Tensor:
    """float64 convolution of Y with W: (N, Co, *out)."""
    f = Flat(geo, y.shape[0])
    wo, x = per_offset(w), f.split(y)
    out = torch.zeros((w.shape[0], f.total), dtype=torch.float64, device=y.device)
    for a, b in f.blocks(y.device):
        block = out[:, a:b]
        for j, (r, shift) in enumerate(zip(f.phases, f.shifts)):
            block.addmm_(wo[j], x[r, :, a + shift:b + shift])
    return f.outputs(out)


def input_grad(g: torch.Tensor, w: torch.Tensor, geo) -> torch.Tensor:
    """float64 gradient of :func:`forward` with respect to Y: (N, Ci, *S)."""
    f = Flat(geo, g.shape[0])
    wt = per_offset(w).transpose(1, 2).contiguous()  # (O, Ci, Co)
    grid = f.grid(g)
    gx = torch.zeros((f.count, w.shape[1], f.total), dtype=torch.float64, device=g.device)
    for a, b in f.blocks(g.device):
        block = grid[:, a:b]
        for j, (r, shift) in enumerate(zip(f.phases, f.shifts)):
            gx[r, :, a + shift:b + shift].addmm_(wt[j], block)
    return f.merge(gx)


def weight_grad(g: torch.Tensor, y: torch.Tensor, w_shape, geo) -> torch.Tensor:
    """float64 gradient of :func:`forward` with respect to W: (Co, Ci, *k). With stride 1 the offsets along
    the last kernel axis differ by one dilation step, so each block stacks the input at those ``kw`` shifts once
    (``kw * Ci`` rows) and each group of ``kw`` offsets is one wider GEMM (BLAS runs it faster than ``kw`` GEMMs
    of Ci columns). The stack spans the block plus the largest group shift; where that shift exceeds a block
    (grids above about 45² per slice), the convolution is strided, or on a GPU: one GEMM per offset."""
    f = Flat(geo, g.shape[0])
    co, ci = w_shape[0], w_shape[1]
    kw, step = geo.kernel[-1], geo.dilation[-1]
    halo = max(f.shifts[j] for j in range(0, len(geo.offsets), kw))  # geo.offsets runs the last axis fastest
    if any(st != 1 for st in geo.stride) or halo > FLAT_BLOCK or g.device.type != "cpu":
        kw = 1  # strided, a grid so large that the stack would copy more than it saves, or a GPU (one block)
    firsts = list(range(0, len(geo.offsets), kw))
    gw = torch.zeros((len(firsts), co, kw * ci), dtype=torch.float64, device=g.device)
    grid, x = f.grid(g), f.split(y)
    for a, b in f.blocks(g.device):
        block = grid[:, a:b]
        if kw == 1:
            for j, (r, shift) in enumerate(zip(f.phases, f.shifts)):
                gw[j].addmm_(block, x[r, :, a + shift:b + shift].t())
            continue
        stack = torch.cat([x[0, :, a + o * step:b + halo + o * step] for o in range(kw)])
        for i, j in enumerate(firsts):
            gw[i].addmm_(block, stack[:, f.shifts[j]:f.shifts[j] + b - a].t())
    return gw.view(len(firsts), co, kw, ci).permute(1, 3, 0, 2).reshape(*w_shape)
