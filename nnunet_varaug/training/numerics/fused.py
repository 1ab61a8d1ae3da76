"""Fused compiled kernels for the commonest element-wise ops (the one job of this module): ``add``/``sub``
(with ``alpha``), ``mul`` and ``div`` of contiguous float32 CPU tensors, tensor or scalar second operand, out of
place or in place. They compute what the generic route computes (the float64 result of the float32 operands,
scalars first rounded to float32, rounded with the addresses of the result's elements) in one pass instead of
four; anything else returns ``NotImplemented`` and takes the generic route.
"""
from __future__ import annotations

import ctypes

import torch

from nnunet_varaug.training.numerics import kernels
from nnunet_varaug.training.numerics.dtypes import float32_scalar
from nnunet_varaug.training.numerics.rounder import Rounder

aten = torch.ops.aten
F32 = torch.float32
ADD, MUL, DIV = 0, 1, 2


def _operand(other, like: torch.Tensor):
    """(tensor or None, scalar) for the second operand, or None when the kernel does not apply."""
    if isinstance(other, torch.Tensor):
        if other.dim() == 0 and other.dtype in (torch.float32, torch.float64) and other.device.type == "cpu":
            return None, float32_scalar(float(other.item()))
        if other.dtype == F32 and other.shape == like.shape and other.is_contiguous():
            return other, 0.0
        return None
    if isinstance(other, (int, float)) and not isinstance(other, bool):
        return None, float32_scalar(float(other))
    return None


def _run(rounder: Rounder, op: int, a: torch.Tensor, other, alpha, out: torch.Tensor):
    if rounder.t(F32) != 24 or not (a.dtype == F32 and a.is_contiguous() and kernels.usable(a)):
        return NotImplemented
    operand = _operand(other, a)
    if operand is None:
        return NotImplemented
    b, scalar = operand
    n = a.numel()
    base = rounder.reserve(n)
    rounder.elements += n
    key, op_index, iteration, directed = rounder.kernel_noise()
    lib = kernels.library()
    args = kernels.noise_args(key, op_index, iteration, directed)
    alpha = float32_scalar(float(alpha))
    ap, bp, yp = a.data_ptr(), (b.data_ptr() if b is not None else 0), out.data_ptr()

    def work(start: int, stop: int) -> None:
        lib.nv_binary_f32(ctypes.c_void_p(ap + 4 * start), ctypes.c_void_p(bp + 4 * start if bp else 0),
                          ctypes.c_int(1 if b is not None else 0), ctypes.c_double(scalar), ctypes.c_double(alpha),
                          ctypes.c_int(op), ctypes.c_void_p(yp + 4 * start), ctypes.c_int64(stop - start),
                          *args, ctypes.c_uint64(base + start))

    kernels.run_chunks(n, work)
    return out


def _binary(op: int, sign: float = 1.0, inplace: bool = False):
    def route(rounder: Rounder, a, other, alpha=1):
        if not isinstance(a, torch.Tensor):
            return NotImplemented
        out = a if inplace else torch.empty_like(a, memory_format=torch.contiguous_format)
        if isinstance(other, torch.Tensor) and other.dim() > 0 and \
                other.untyped_storage().data_ptr() == a.untyped_storage().data_ptr():
            return NotImplemented  # operands sharing memory: the generic route copies them first
        return _run(rounder, op, a, other, sign * alpha, out)
    return route


FUSED = {
    aten.add.Tensor: _binary(ADD), aten.add_.Tensor: _binary(ADD, inplace=True),
    aten.sub.Tensor: _binary(ADD, -1.0), aten.sub_.Tensor: _binary(ADD, -1.0, inplace=True),
    aten.mul.Tensor: _binary(MUL), aten.mul_.Tensor: _binary(MUL, inplace=True),
    aten.div.Tensor: _binary(DIV), aten.div_.Tensor: _binary(DIV, inplace=True),
}
