"""The ops the dispatch mode computes itself instead of through PyTorch's float64 kernel (the one job of this
module: the table :data:`SPECIAL` of (granularity, op) -> route, and the routes of convolutions, matrix products
and sums).

A route takes the :class:`.rounder.Rounder` of the op and the op's arguments, and returns the op's float32
results, rounded, or ``NotImplemented`` (the generic route then rounds PyTorch's float64 result once). The routes
of normalisation, softmax, losses and norms are in :mod:`.reductions`.
"""
from __future__ import annotations

import torch

from nnunet_varaug.training.numerics import conv, reductions
from nnunet_varaug.training.numerics.lanes import sr_matmul, sr_sum
from nnunet_varaug.training.numerics.rounder import Rounder

aten = torch.ops.aten
F32 = torch.float32


def _all_f32(*tensors) -> bool:
    return all(t is None or (isinstance(t, torch.Tensor) and t.dtype == F32 and t.layout == torch.strided)
               for t in tensors)


def _conv(instruction: bool):
    def route(rounder: Rounder, x, w, bias, stride, padding, dilation, transposed, output_padding, groups):
        if not _all_f32(x, w, bias) or not conv.supported(x, w, groups):
            return NotImplemented
        return conv.convolution(x, w, bias, stride, padding, dilation, transposed, output_padding, rounder,
                                instruction)
    return route


def _conv_backward(instruction: bool):
    def route(rounder: Rounder, grad, x, w, bias_sizes, stride, padding, dilation, transposed, output_padding,
              groups, mask):
        if not _all_f32(grad, x, w) or not conv.supported(x, w, groups):
            return NotImplemented
        return conv.convolution_backward(grad, x, w, stride, padding, dilation, transposed, output_padding, mask,
                                         rounder, instruction)
    return route


def _mm(rounder: Rounder, a, b):
    if not _all_f32(a, b):
        return NotImplemented
    return sr_matmul(a, b, rounder)


def _bmm(rounder: Rounder, a, b):
    if not _all_f32(a, b):
        return NotImplemented
    return torch.stack([sr_matmul(a[i], b[i], rounder) for i in range(a.shape[0])])


def _addmm(rounder: Rounder, bias, a, b, beta=1, alpha=1):
    if beta != 1 or alpha != 1 or not _all_f32(bias, a, b):
        return NotImplemented
    product = sr_matmul(a, b, rounder)
    return rounder.round((product.double() + bias.double()).contiguous(), F32)


def _sum(rounder: Rounder, x, dim=None, keepdim=False, dtype=None):
    if not _all_f32(x) or dtype not in (None, F32) or x.dim() == 0:
        return NotImplemented
    return sr_sum(x, dim, keepdim, rounder)


def _mean(rounder: Rounder, x, dim=None, keepdim=False, dtype=None):
    total = _sum(rounder, x, dim, keepdim, dtype)
    if total is NotImplemented:
        return total
    count = x.numel() // max(1, total.numel())
    return rounder.round(total.double() / count, F32)


def _sum_default(rounder: Rounder, x, dtype=None):
    return _sum(rounder, x, None, False, dtype)


def _mean_default(rounder: Rounder, x, dtype=None):
    return _mean(rounder, x, None, False, dtype)


SPECIAL = {
    ("op", aten.convolution.default): _conv(False),
    ("op", aten.convolution_backward.default): _conv_backward(False),
    ("instruction", aten.convolution.default): _conv(True),
    ("instruction", aten.convolution_backward.default): _conv_backward(True),
    ("instruction", aten.mm.default): _mm,
    ("instruction", aten.bmm.default): _bmm,
    ("instruction", aten.addmm.default): _addmm,
    ("instruction", aten.sum.dim_IntList): _sum,
    ("instruction", aten.sum.default): _sum_default,
    ("instruction", aten.mean.dim): _mean,
    ("instruction", aten.mean.default): _mean_default,
    **{("instruction", op): route for op, route in reductions.ROUTES.items()},
}

#: The aten ops that run per instruction under ``granularity="instruction"`` (all others: one rounding per op).
INSTRUCTION_LEVEL_OPS = tuple(sorted(str(f) for g, f in SPECIAL if g == "instruction"))
