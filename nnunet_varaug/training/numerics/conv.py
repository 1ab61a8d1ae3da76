"""Convolutions and transposed convolutions for the dispatch mode (the one job of this module), op level
(float64 accumulation, one rounding by the caller) and instruction level (every multiply and add rounded).

A transposed convolution is the input gradient of an ordinary one, and its gradients are an ordinary
convolution (input gradient) and a weight gradient with the roles of input and output exchanged, so three
primitives serve both, for a convolution of input Y (N, Ci, *S) with weight W (Co, Ci, *k):

* ``forward``: (N, Co, *O). Op level: one float64 matrix product per kernel offset, accumulated in float64
  (products of float32 are exact in float64; each addition errs below 2^-53 relative), on the phase grids of
  :mod:`.flatconv` when they are at most 1.5 times the output, else one im2col GEMM or one GEMM per offset
  (:func:`choose_route`). Instruction level: the
  im2col product, K = Ci * prod(k) terms ordered (input channel, kernel offsets) as ``W.reshape(Co, -1)``, each
  output a per-instruction dot product (:mod:`.lanes`).
* ``input_grad``: (N, Ci, *S). Instruction level: the im2col columns ``W^T g`` (dot products over Co), then
  added into the input one kernel offset after the other, each addition rounded.
* ``weight_grad``: (Co, Ci, *k). Instruction level: dot products over the N * P output positions.

The bias (forward) is one more rounded addition per output; its gradient a per-instruction sum.
"""
from __future__ import annotations

import itertools
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from nnunet_varaug.training.numerics import flatconv
from nnunet_varaug.training.numerics.lanes import sr_dot, sr_sum_rows
from nnunet_varaug.training.numerics.rounder import Rounder

F32 = torch.float32


class Geometry:
    """Strides, padding, dilation, output size and kernel offsets of a convolution of input size ``size``."""

    def __init__(self, size: Sequence[int], kernel: Sequence[int], stride, padding, dilation):
        dims = len(size)
        self.stride, self.padding, self.dilation = ([int(v) for v in (a if len(a) == dims else list(a) * dims)]
                                                    for a in (stride, padding, dilation))
        self.size = [int(s) for s in size]
        self.kernel = [int(k) for k in kernel]
        self.out = [(s + 2 * p - d * (k - 1) - 1) // st + 1 for s, k, st, p, d in
                    zip(self.size, self.kernel, self.stride, self.padding, self.dilation)]
        self.offsets = list(itertools.product(*(range(k) for k in self.kernel)))
        self.pad = [p for p in reversed(self.padding) for _ in (0, 1)]
        self.positions = 1
        for o in self.out:
            self.positions *= o

    def shifted(self, xp: torch.Tensor, offset: Sequence[int]) -> torch.Tensor:
        """The view of padded input ``xp`` (N, C, *S+2p) that kernel ``offset`` multiplies: (N, C, *out)."""
        index = [slice(None), slice(None)]
        for o, n, s, d in zip(offset, self.out, self.stride, self.dilation):
            index.append(slice(o * d, o * d + (n - 1) * s + 1, s))
        return xp[tuple(index)]

    def padded(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, self.pad) if any(self.padding) else x

    def unpadded(self, xp: torch.Tensor) -> torch.Tensor:
        return xp[(slice(None), slice(None)) + tuple(slice(p, p + s) for p, s in zip(self.padding, self.size))]

    def _windows(self, y: torch.Tensor) -> torch.Tensor:
        """(N, Ci, *out, *k): every output position's window, a view when the dilation is 1 (else a copy)."""
        yp = self.padded(y)
        dims = len(self.out)
        if all(d == 1 for d in self.dilation):
            for i in range(dims):
                yp = yp.unfold(2 + i, self.kernel[i], self.stride[i])
            return yp
        cols = torch.stack([self.shifted(yp, o) for o in self.offsets], dim=-1)  # N, Ci, *out, O
        return cols.view(*cols.shape[:-1], *self.kernel)

    def columns(self, y: torch.Tensor) -> torch.Tensor:
        """im2col of Y (N, Ci, *S): (N * P, Ci * prod(k)), columns ordered (channel, offsets)."""
        win = self._windows(y)
        dims = len(self.out)
        order = [0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims)]
        return win.permute(*order).reshape(y.shape[0] * self.positions, -1)

    def columns_t(self, y: torch.Tensor) -> torch.Tensor:
        """The transpose of :meth:`columns`, built in one copy: (Ci * prod(k), N * P)."""
        win = self._windows(y)
        dims = len(self.out)
        order = [1, *range(2 + dims, 2 + 2 * dims), 0, *range(2, 2 + dims)]
        return win.permute(*order).reshape(-1, y.shape[0] * self.positions)


def supported(x: torch.Tensor, w: torch.Tensor, groups: int) -> bool:
    """Whether the routes here handle this convolution (else the caller computes it as one generic op)."""
    return groups == 1 and x.dim() in (3, 4, 5) and w.dim() == x.dim() and x.layout == torch.strided


# ---- op level: float64 accumulation ----------------------------------------------------------------------------
#: im2col matrices above this many float64 values are not built; one GEMM per kernel offset instead.
IM2COL_LIMIT = 1 << 21


def choose_route(geo: Geometry, n: int, ci: int) -> str:
    """'flat' (shifted GEMMs on the phase grids, :mod:`.flatconv`), 'im2col' (one GEMM) or 'offsets' (one GEMM per
    offset)."""
    if flatconv.pays(geo):
        return "flat"
    return "im2col" if n * geo.positions * ci * len(geo.offsets) <= IM2COL_LIMIT else "offsets"


def forward_high(y: torch.Tensor, w: torch.Tensor, geo: Geometry) -> torch.Tensor:
    """float64 convolution of Y (N, Ci, *S) with W (Co, Ci, *k): (N, Co, *out), by the route of
    :func:`choose_route`."""
    n, co = y.shape[0], w.shape[0]
    route = choose_route(geo, n, y.shape[1])
    if route == "flat":
        return flatconv.forward(y, w, geo)
    if route == "offsets":
        wo, yp = flatconv.per_offset(w), geo.padded(y.double())
        result = torch.zeros((n, co, geo.positions), dtype=torch.float64, device=y.device)
        for j, offset in enumerate(geo.offsets):
            result.baddbmm_(wo[j].expand(n, -1, -1), geo.shifted(yp, offset).reshape(n, y.shape[1], -1))
        return result.view(n, co, *geo.out)
    out = w.double().reshape(co, -1) @ geo.columns(y.double()).t()  # (Co, N * P)
    return out.view(co, n, *geo.out).transpose(0, 1)


def input_grad_high(g: torch.Tensor, w: torch.Tensor, geo: Geometry) -> torch.Tensor:
    """float64 gradient of :func:`forward_high` with respect to Y: (N, Ci, *S)."""
    n, co, ci = g.shape[0], w.shape[0], w.shape[1]
    route = choose_route(geo, n, ci)
    if route == "flat":
        return flatconv.input_grad(g, w, geo)
    gip = torch.zeros((n, ci, *(s + 2 * p for s, p in zip(geo.size, geo.padding))), dtype=torch.float64,
                      device=g.device)
    if route == "offsets":
        wt, gd = flatconv.per_offset(w).transpose(1, 2).contiguous(), g.double().reshape(n, co, -1)
        for j, offset in enumerate(geo.offsets):
            geo.shifted(gip, offset).add_(torch.matmul(wt[j], gd).view(n, ci, *geo.out))
        return geo.unpadded(gip)
    gpos = g.double().reshape(n, co, -1).permute(0, 2, 1).reshape(-1, co)  # (N * P, Co)
    gcols = (gpos @ w.double().reshape(co, -1)).view(n, *geo.out, ci, len(geo.offsets))
    for j, offset in enumerate(geo.offsets):
        geo.shifted(gip, offset).add_(gcols[..., j].movedim(-1, 1))
    return geo.unpadded(gip)


def weight_grad_high(g: torch.Tensor, y: torch.Tensor, w_shape, geo: Geometry) -> torch.Tensor:
    """float64 gradient of :func:`forward_high` with respect to W: (Co, Ci, *k)."""
    co, ci = w_shape[0], w_shape[1]
    route = choose_route(geo, g.shape[0], ci)
    if route == "flat":
        return flatconv.weight_grad(g, y, w_shape, geo)
    gflat = g.double().transpose(0, 1).reshape(co, -1)  # (Co, N * P)
    if route == "offsets":
        gw = torch.empty((co, ci, len(geo.offsets)), dtype=torch.float64, device=g.device)
        yp = geo.padded(y.double())
        for j, offset in enumerate(geo.offsets):
            gw[:, :, j] = gflat @ geo.shifted(yp, offset).transpose(0, 1).reshape(ci, -1).t()
        return gw.view(*w_shape)
    return (gflat @ geo.columns(y.double())).view(*w_shape)


# ---- instruction level -----------------------------------------------------------------------------------------
def forward_instr(y: torch.Tensor, w: torch.Tensor, geo: Geometry, rounder: Rounder) -> torch.Tensor:
    """Per-instruction convolution of Y with W: (N, Co, *out) float32."""
    n, co = y.shape[0], w.shape[0]
    out = sr_dot(w.reshape(co, -1), geo.columns(y), rounder)  # (Co, N * P)
    return out.view(co, n, *geo.out).transpose(0, 1).contiguous()


def input_grad_instr(g: torch.Tensor, w: torch.Tensor, geo: Geometry, rounder: Rounder) -> torch.Tensor:
    """Per-instruction input gradient: the columns ``W^T g``, added into the input offset by offset, rounded."""
    n, co, ci = g.shape[0], w.shape[0], w.shape[1]
    gpos = g.reshape(n, co, -1).permute(0, 2, 1).reshape(-1, co)  # (N * P, Co)
    gcols = sr_dot(w.reshape(co, -1).t(), gpos, rounder).view(ci, len(geo.offsets), n, *geo.out)
    gip = torch.zeros((n, ci, *(s + 2 * p for s, p in zip(geo.size, geo.padding))), dtype=F32, device=g.device)
    for j, offset in enumerate(geo.offsets):
        view = geo.shifted(gip, offset)
        total = view.double() + gcols[:, j].transpose(0, 1).double()
        view.copy_(rounder.round(total, F32))
    return geo.unpadded(gip).contiguous()


def weight_grad_instr(g: torch.Tensor, y: torch.Tensor, w_shape, geo: Geometry, rounder: Rounder) -> torch.Tensor:
    """Per-instruction weight gradient: dot products of the output gradient and the im2col columns over N * P."""
    co = w_shape[0]
    gflat = g.transpose(0, 1).reshape(co, -1)
    return sr_dot(gflat, geo.columns_t(y), rounder).view(*w_shape)


def bias_grad_instr(g: torch.Tensor, rounder: Rounder) -> torch.Tensor:
    return sr_sum_rows(g.transpose(0, 1).reshape(g.shape[1], -1), rounder)


# ---- the aten ops ----------------------------------------------------------------------------------------------
def transposed_size(x_size, w_size, stride, padding, dilation, output_padding) -> List[int]:
    dims = len(x_size)
    expand = lambda a: [int(v) for v in (a if len(a) == dims else list(a) * dims)]  # noqa: E731
    stride, padding, dilation, output_padding = map(expand, (stride, padding, dilation, output_padding))
    return [(s - 1) * st - 2 * p + d * (k - 1) + op + 1 for s, k, st, p, d, op in
            zip(x_size, w_size, stride, padding, dilation, output_padding)]


def convolution(x, w, bias, stride, padding, dilation, transposed, output_padding, rounder: Rounder,
                instruction: bool) -> torch.Tensor:
    """aten.convolution, float32, groups == 1: rounded once (op level) or per instruction."""
    if transposed:
        size = transposed_size(x.shape[2:], w.shape[2:], stride, padding, dilation, output_padding)
        geo = Geometry(size, w.shape[2:], stride, padding, dilation)
        y = input_grad_instr(x, w, geo, rounder) if instruction else input_grad_high(x, w, geo)
    else:
        geo = Geometry(x.shape[2:], w.shape[2:], stride, padding, dilation)
        y = forward_instr(x, w, geo, rounder) if instruction else forward_high(x, w, geo)
    view = [1, -1] + [1] * (y.dim() - 2)
    if not instruction:
        if bias is not None:
            y = y + bias.double().view(view)
        return rounder.round(y.contiguous(), F32)
    if bias is not None:
        y = rounder.round((y.double() + bias.double().view(view)).contiguous(), F32)
    return y


def convolution_backward(grad, x, w, stride, padding, dilation, transposed, output_padding, mask,
                         rounder: Rounder, instruction: bool) -> Tuple[Optional[torch.Tensor], ...]:
    """aten.convolution_backward, float32, groups == 1: (grad_input, grad_weight, grad_bias) per ``mask``."""
    if transposed:  # x (N, Cin, *Sx) -> out (N, Cout, *Sy): the input gradient of a convolution of out with w
        geo = Geometry(grad.shape[2:], w.shape[2:], stride, padding, dilation)
        y, g = grad, x  # the ordinary convolution's input and output (gradient)
    else:
        geo = Geometry(x.shape[2:], w.shape[2:], stride, padding, dilation)
        y, g = x, grad
    results: List[Optional[torch.Tensor]] = [None, None, None]
    if mask[0]:
        if transposed:
            gi = forward_instr(grad, w, geo, rounder) if instruction else forward_high(grad, w, geo)
        else:
            gi = input_grad_instr(grad, w, geo, rounder) if instruction else input_grad_high(grad, w, geo)
        results[0] = gi if instruction else rounder.round(gi.contiguous(), F32)
    if mask[1]:
        gw = weight_grad_instr(g, y, w.shape, geo, rounder) if instruction else weight_grad_high(g, y, w.shape, geo)
        results[1] = gw if instruction else rounder.round(gw.contiguous(), F32)
    if mask[2]:
        results[2] = (bias_grad_instr(grad, rounder) if instruction
                      else rounder.round(grad.double().sum(dim=[0] + list(range(2, grad.dim()))), F32))
    return tuple(results)
