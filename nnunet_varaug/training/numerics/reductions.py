"""Per-instruction routes of the training step's other reductions (the one job of this module): normalisation
statistics, softmax, the NLL loss and norms under ``granularity="instruction"``.

Each route is a documented sequence of float32 instructions, each rounded (written ``r(.)`` below; sums and dot
products per instruction in the lane order of :mod:`.lanes`; ``exp``, ``log`` and ``sqrt`` count as one
instruction each, their float64 value rounded once). For a channel or row of M values:

* ``native_batch_norm`` (training, no running statistics; nnU-Net's instance norm): ``mean = r(sum(x) / M)``,
  ``d = r(x - mean)``, ``var = r(sum(r(d * d)) / M)``, ``invstd = r(1 / r(sqrt(r(var + eps))))``,
  ``y = r(r(r(d * invstd) * w) + b)``.
* ``native_batch_norm_backward``: ``xhat = r(r(x - mean) * invstd)``, ``gb = sum(dy)``, ``gw = dot(dy, xhat)``,
  ``dx = r(r(r(dy - r(gb / M)) - r(xhat * r(gw / M))) * r(invstd * w))``.
* ``_softmax``: ``m = max(x)`` (exact), ``e = r(exp(r(x - m)))``, ``y = r(e / sum(e))``; ``_log_softmax``:
  ``d = r(x - m)``, ``y = r(d - r(log(sum(r(exp(d))))))``; their backward passes:
  ``dx = r(y * r(g - dot(g, y)))`` and ``dx = r(g - r(r(exp(y)) * sum(g)))``.
* ``nll_loss2d_forward`` (weight None, reduction mean or sum): ``sum(-x[target])`` over the positions in order
  (ignored positions are exact zeros), divided by their count with one rounding for ``mean``; backward:
  ``dx[target] = r(-g / count)``.
* ``_foreach_norm`` and ``linalg_vector_norm`` (2-norm): ``r(sqrt(dot(x, x)))``.

Routes return ``NotImplemented`` (one rounding of PyTorch's float64 result) outside these cases: running
statistics, class weights, other norms, non-float32 inputs.
"""
from __future__ import annotations

import torch

from nnunet_varaug.training.numerics.lanes import sr_dot, sr_dot_rows, sr_sum_rows
from nnunet_varaug.training.numerics.rounder import Rounder

aten = torch.ops.aten
F32 = torch.float32


def _f32(*tensors) -> bool:
    return all(t is None or (isinstance(t, torch.Tensor) and t.dtype == F32 and t.layout == torch.strided)
               for t in tensors)


def _r(rounder: Rounder, high: torch.Tensor) -> torch.Tensor:
    """One rounded float32 instruction per element of the float64 ``high``."""
    return rounder.round(high.contiguous(), F32)


def _channels(x: torch.Tensor) -> torch.Tensor:
    """(N, C, *S) -> (C, N * prod(S)), the rows a channel's statistics reduce."""
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def _from_channels(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    shape = [like.shape[1], like.shape[0], *like.shape[2:]]
    return rows.reshape(shape).transpose(0, 1).contiguous()


def batch_norm(rounder: Rounder, x, weight, bias, running_mean, running_var, training, momentum, eps):
    if not training or running_mean is not None or running_var is not None or not _f32(x, weight, bias):
        return NotImplemented
    rows = _channels(x)
    m = rows.shape[1]
    mean = _r(rounder, sr_sum_rows(rows, rounder).double() / m)
    d = _r(rounder, rows.double() - mean.double().unsqueeze(1))
    sq = _r(rounder, d.double() * d.double())
    var = _r(rounder, sr_sum_rows(sq, rounder).double() / m)
    std = _r(rounder, torch.sqrt(_r(rounder, var.double() + eps).double()))
    invstd = _r(rounder, 1.0 / std.double())
    y = _r(rounder, d.double() * invstd.double().unsqueeze(1))
    if weight is not None:
        y = _r(rounder, y.double() * weight.double().unsqueeze(1))
    if bias is not None:
        y = _r(rounder, y.double() + bias.double().unsqueeze(1))
    return _from_channels(y, x), mean, invstd


def batch_norm_backward(rounder: Rounder, dy, x, weight, running_mean, running_var, save_mean, save_invstd, train,
                        eps, mask):
    if not train or not _f32(dy, x, weight, save_mean, save_invstd):
        return NotImplemented
    rows, grows = _channels(x), _channels(dy)
    m = rows.shape[1]
    invstd = save_invstd.double().unsqueeze(1)
    xhat = _r(rounder, _r(rounder, rows.double() - save_mean.double().unsqueeze(1)).double() * invstd)
    gb = sr_sum_rows(grows, rounder)
    gw = sr_dot_rows(grows, xhat, rounder)
    dx = None
    if mask[0]:
        w = weight.double() if weight is not None else torch.ones_like(save_invstd, dtype=torch.float64)
        scale = _r(rounder, save_invstd.double() * w)
        centred = _r(rounder, grows.double() - _r(rounder, gb.double() / m).double().unsqueeze(1))
        proj = _r(rounder, xhat.double() * _r(rounder, gw.double() / m).double().unsqueeze(1))
        dx = _from_channels(_r(rounder, _r(rounder, centred.double() - proj.double()).double()
                                * scale.double().unsqueeze(1)), x)
    return dx, (gw if mask[1] else None), (gb if mask[2] else None)


def _rows_last(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x.movedim(dim, -1).reshape(-1, x.shape[dim])


def _back(rows: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    moved = list(like.movedim(dim, -1).shape)
    return rows.reshape(moved).movedim(-1, dim).contiguous()


def softmax(rounder: Rounder, x, dim, half_to_float):
    if half_to_float or not _f32(x) or x.dim() == 0:
        return NotImplemented
    dim = dim % x.dim()
    rows = _rows_last(x, dim)
    e = _r(rounder, torch.exp(_r(rounder, rows.double() - rows.amax(1, keepdim=True).double()).double()))
    return _back(_r(rounder, e.double() / sr_sum_rows(e, rounder).double().unsqueeze(1)), x, dim)


def log_softmax(rounder: Rounder, x, dim, half_to_float):
    if half_to_float or not _f32(x) or x.dim() == 0:
        return NotImplemented
    dim = dim % x.dim()
    rows = _rows_last(x, dim)
    d = _r(rounder, rows.double() - rows.amax(1, keepdim=True).double())
    e = _r(rounder, torch.exp(d.double()))
    log_sum = _r(rounder, torch.log(sr_sum_rows(e, rounder).double()))
    return _back(_r(rounder, d.double() - log_sum.double().unsqueeze(1)), x, dim)


def softmax_backward(rounder: Rounder, grad, out, dim, input_dtype):
    if input_dtype != F32 or not _f32(grad, out) or out.dim() == 0:
        return NotImplemented
    dim = dim % out.dim()
    g, y = _rows_last(grad, dim), _rows_last(out, dim)
    dot = sr_dot_rows(g, y, rounder)
    return _back(_r(rounder, y.double() * _r(rounder, g.double() - dot.double().unsqueeze(1)).double()), out, dim)


def log_softmax_backward(rounder: Rounder, grad, out, dim, input_dtype):
    if input_dtype != F32 or not _f32(grad, out) or out.dim() == 0:
        return NotImplemented
    dim = dim % out.dim()
    g, y = _rows_last(grad, dim), _rows_last(out, dim)
    total = sr_sum_rows(g, rounder)
    scaled = _r(rounder, _r(rounder, torch.exp(y.double())).double() * total.double().unsqueeze(1))
    return _back(_r(rounder, g.double() - scaled.double()), out, dim)


def _picked(x: torch.Tensor, target: torch.Tensor, ignore_index: int):
    valid = target != ignore_index
    index = torch.where(valid, target, torch.zeros_like(target)).unsqueeze(1)
    values = torch.where(valid, -x.gather(1, index).squeeze(1), torch.zeros((), dtype=x.dtype))
    return values, valid


def nll_loss2d(rounder: Rounder, x, target, weight, reduction, ignore_index):
    if weight is not None or reduction not in (1, 2) or not _f32(x):
        return NotImplemented
    values, valid = _picked(x, target, ignore_index)
    total = sr_sum_rows(values.reshape(1, -1), rounder)[0]
    count = valid.sum().to(F32)
    if reduction == 1:
        total = _r(rounder, total.double() / count.double())
    return total, count


def nll_loss2d_backward(rounder: Rounder, grad, x, target, weight, reduction, ignore_index, total_weight):
    if weight is not None or reduction not in (1, 2) or not _f32(grad, x):
        return NotImplemented
    step = -grad.double() / total_weight.double() if reduction == 1 else -grad.double()
    value = _r(rounder, step.reshape(1))[0]
    out = torch.zeros_like(x)
    valid = target != ignore_index
    index = torch.where(valid, target, torch.zeros_like(target)).unsqueeze(1)
    out.scatter_(1, index, torch.where(valid, value, torch.zeros((), dtype=F32)).unsqueeze(1).to(F32))
    return out


def _norm(rounder: Rounder, x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(1, -1)
    return _r(rounder, torch.sqrt(sr_dot(flat, flat, rounder).double())).reshape(())


def foreach_norm(rounder: Rounder, tensors, ord=2, dtype=None):
    if ord != 2 or dtype not in (None, F32) or not _f32(*tensors):
        return NotImplemented
    return [_norm(rounder, t) for t in tensors]


def vector_norm(rounder: Rounder, x, ord=2, dim=None, keepdim=False, dtype=None):
    if ord != 2 or dim not in (None, [], ()) or keepdim or dtype not in (None, F32) or not _f32(x):
        return NotImplemented
    return _norm(rounder, x)


ROUTES = {
    aten.native_batch_norm.default: batch_norm,
    aten.native_batch_norm_backward.default: batch_norm_backward,
    aten._softmax.default: softmax,
    aten._log_softmax.default: log_softmax,
    aten._softmax_backward_data.default: softmax_backward,
    aten._log_softmax_backward_data.default: log_softmax_backward,
    aten.nll_loss2d_forward.default: nll_loss2d,
    aten.nll_loss2d_backward.default: nll_loss2d_backward,
    aten.nll_loss_forward.default: nll_loss2d,
    aten.nll_loss_backward.default: nll_loss2d_backward,
    aten._foreach_norm.Scalar: foreach_norm,
    aten.linalg_vector_norm.default: vector_norm,
}

