"""``MonteCarloArithmetic``: the ``TorchDispatchMode`` that stochastically rounds every floating-point aten
result while it is active (the one job of this module: dispatch; rounding and reductions live beside it).

Each perturbed op (:mod:`.ops` decides which) is recomputed in the high dtype of its working dtype (float64 for
float32, float32 for float16/bfloat16), with Python float scalars first rounded to float32 as PyTorch's
kernels round them, and its floating results are rounded back by :func:`.rounding.stochastic_round`:

* ``granularity="op"``: one stochastic rounding per aten op; reductions accumulate in the high dtype
  (:mod:`.reductions`). The model of hardware stochastic rounding applied at an accumulator's output.
* ``granularity="instruction"``: convolutions (2-d and 3-d, ungrouped, not transposed), their gradients,
  ``mm``/``addmm``/``bmm`` and ``sum``/``mean`` run as sequences of stochastically rounded float32 multiplies
  and additions in the lane order of :mod:`.reductions` (Verificarlo's model of one rounding per
  instruction); every other op (element-wise ops, normalisation, softmax, losses, transposed convolutions)
  is one instruction-level rounding of its high-precision result, i.e. as at op level.

Not perturbed: ops that do no rounding (:data:`.ops.NO_ROUNDING`, views), float64 work (float64 is the high
precision), integer and boolean results, sparse and complex tensors. Random bits come from the mode's own
``torch.Generator`` per device, seeded from (stream, device): the global RNG is never touched.
"""
from __future__ import annotations

import struct
from typing import Any, Dict, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from nnunet_varaug.training.numerics import reductions as red
from nnunet_varaug.training.numerics.ops import plan_for
from nnunet_varaug.training.numerics.rounding import (HIGH, PRECISION, PrecisionError, check_virtual_bits, random_round,
                                                      stochastic_round, words_per_rounding)
from nnunet_varaug.training.seeding import derive_seed

GRANULARITIES = ("op", "instruction")
aten = torch.ops.aten


def _float32_scalar(v: float) -> float:
    return struct.unpack("f", struct.pack("f", v))[0] if v == v and abs(v) < 3.4e38 else v


class MonteCarloArithmetic(TorchDispatchMode):
    """Stochastically round every floating-point aten result (module docstring) while active.

    Example::

        mca = MonteCarloArithmetic(virtual_bits=24, stream=3, granularity="op")
        with mca:
            loss = model(x).sum()
            loss.backward()          # backward ops run under the mode too
            optimizer.step()

    Args:
        virtual_bits: t; None means each dtype's own precision (24 for float32, 11 for float16, 8 for
            bfloat16): stochastic rounding. t below it is Verificarlo's random rounding at t bits.
        stream: noise stream index; equal streams give bitwise-equal noise, different streams independent noise.
        seed: overrides the generator seed derived from ``stream``.
        granularity: ``"op"`` or ``"instruction"`` (module docstring).
    """

    def __init__(self, virtual_bits: Optional[int] = None, stream: int = 0, seed: Optional[int] = None,
                 granularity: str = "op"):
        super().__init__()
        if virtual_bits is not None:
            virtual_bits = int(virtual_bits)
            if not 1 <= virtual_bits <= PRECISION[torch.float32]:
                raise PrecisionError(f"virtual precision t={virtual_bits} must be in 1..24 (float32 at most)")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, not {granularity!r}")
        self.virtual_bits = virtual_bits
        self.stream = int(stream)
        self.granularity = granularity
        self._seed = derive_seed("mca", self.stream) if seed is None else int(seed)
        self._generators: Dict[torch.device, torch.Generator] = {}
        self.perturbed_ops = 0
        self.perturbed_elements = 0

    def __repr__(self) -> str:
        bits = "dtype precision" if self.virtual_bits is None else self.virtual_bits
        return f"MonteCarloArithmetic(virtual_bits={bits}, stream={self.stream}, granularity={self.granularity!r})"

    # ---- noise ---------------------------------------------------------------------------------------------
    def reseed(self, *keys) -> None:
        """Restart the noise: the generators are re-seeded from (stream, *keys) on their next use."""
        self._seed = derive_seed("mca", self.stream, *keys)
        self._generators.clear()

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(derive_seed(self._seed, str(device)))
            self._generators[device] = gen
        return gen

    def round(self, high: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Stochastically round the high-precision result ``high`` to ``dtype`` with this mode's noise."""
        if self.virtual_bits is not None:
            check_virtual_bits(self.virtual_bits, dtype)
        self.perturbed_elements += high.numel()
        t = check_virtual_bits(self.virtual_bits, dtype)
        per = words_per_rounding(dtype, self.virtual_bits)
        words = torch.randint(0, 2 ** 32, (high.numel(), per), generator=self._generator(high.device),
                              device=high.device)
        if per == 1:
            return stochastic_round(high, dtype, words[:, 0])
        return random_round(high, dtype, t, words)

    def _rounder(self, dtype: torch.dtype):
        if dtype != torch.float32:
            raise NotImplementedError("instruction-level reductions are float32 only")
        return lambda high: self.round(high, dtype)

    # ---- dispatch ------------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        plan = plan_for(func)
        if not plan.perturb or (plan.condition is not None and not plan.condition(args, kwargs)):
            return func(*args, **kwargs)
        low, wide = None, False
        for value in list(args) + list(kwargs.values()):
            for t in (value if isinstance(value, (list, tuple)) else (value,)):
                if isinstance(t, torch.Tensor) and t.dtype in HIGH and t.layout == torch.strided:
                    low = t.dtype if low is None else torch.promote_types(low, t.dtype)
                elif isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.dim() > 0:
                    wide = True  # float32 with float64 promotes to float64: float64 work, left alone
        if low is None or wide:
            return func(*args, **kwargs)
        self.perturbed_ops += 1
        special = _SPECIAL.get((self.granularity, func))
        if special is not None:
            result = special(self, low, *args, **kwargs)
            if result is not NotImplemented:
                return result
        return self._generic(func, low, args, kwargs)

    def _generic(self, func, low: torch.dtype, args, kwargs):
        high = HIGH[low]
        originals: Dict[int, torch.Tensor] = {}

        def up(v: Any) -> Any:
            if isinstance(v, torch.Tensor):
                if v.dtype in HIGH and v.layout == torch.strided:
                    h = v.to(high, copy=True)
                    originals[id(h)] = v
                    return h
                return v
            if isinstance(v, float):
                return _float32_scalar(v)
            if isinstance(v, torch.dtype) and v in HIGH:  # e.g. input_dtype of _log_softmax_backward_data
                return HIGH[v]
            return v

        hargs = tuple(tree_map(up, a) if isinstance(a, (list, tuple)) else up(a) for a in args)
        hkwargs = {k: (tree_map(up, v) if isinstance(v, (list, tuple)) else up(v)) for k, v in kwargs.items()}
        requested = kwargs.get("dtype")
        if isinstance(requested, torch.dtype):
            if requested not in HIGH:
                return func(*args, **kwargs)
            low, high = requested, HIGH[requested]
            hkwargs["dtype"] = high
        out = func(*hargs, **hkwargs)
        for position, name in plan_for(func).writes:
            value = hargs[position] if position < len(hargs) else hkwargs.get(name)
            for h in (value if isinstance(value, (list, tuple)) else (value,)):
                original = originals.get(id(h)) if isinstance(h, torch.Tensor) else None
                if original is not None:
                    if original.shape != h.shape:  # an out= tensor the op resized
                        original.resize_(h.shape)
                    original.copy_(self.round(h, original.dtype) if h.dtype == HIGH[original.dtype] else h)

        def down(r: Any) -> Any:
            if not isinstance(r, torch.Tensor):
                return r
            original = originals.get(id(r))
            if original is not None:  # an in-place op returning its (already rounded) argument
                return original
            return self.round(r, low) if r.dtype == high else r

        return tree_map(down, out)


# ---- special routes ------------------------------------------------------------------------------------------
def _conv_op(mode: MonteCarloArithmetic, low, x, w, bias, stride, padding, dilation, transposed, output_padding,
             groups):
    if low != torch.float32 or not red.conv_supported(x, w, transposed, groups):
        return NotImplemented
    return mode.round(red.conv_forward_high(x, w, bias, stride, padding, dilation), low)


def _conv_backward_op(mode, low, grad, x, w, bias_sizes, stride, padding, dilation, transposed, output_padding,
                      groups, mask):
    if low != torch.float32 or not red.conv_supported(x, w, transposed, groups):
        return NotImplemented
    grads = red.conv_backward_high(grad, x, w, stride, padding, dilation, mask)
    return tuple(None if g is None else mode.round(g.contiguous(), low) for g in grads)


def _conv_instr(mode, low, x, w, bias, stride, padding, dilation, transposed, output_padding, groups):
    if low != torch.float32 or not red.conv_supported(x, w, transposed, groups):
        return NotImplemented
    return red.conv_forward_instr(x, w, bias, stride, padding, dilation, mode._rounder(low))


def _conv_backward_instr(mode, low, grad, x, w, bias_sizes, stride, padding, dilation, transposed,
                         output_padding, groups, mask):
    if low != torch.float32 or not red.conv_supported(x, w, transposed, groups):
        return NotImplemented
    return red.conv_backward_instr(grad, x, w, stride, padding, dilation, mask, mode._rounder(low))


def _mm_instr(mode, low, a, b):
    if low != torch.float32 or a.dtype != low or b.dtype != low:
        return NotImplemented
    return red.sr_matmul(a, b, mode._rounder(low))


def _bmm_instr(mode, low, a, b):
    if low != torch.float32 or a.dtype != low or b.dtype != low:
        return NotImplemented
    return torch.stack([red.sr_matmul(a[i], b[i], mode._rounder(low)) for i in range(a.shape[0])])


def _addmm_instr(mode, low, bias, a, b, beta=1, alpha=1):
    if low != torch.float32 or beta != 1 or alpha != 1 or a.dtype != low or b.dtype != low or bias.dtype != low:
        return NotImplemented
    rnd = mode._rounder(low)
    return rnd(red.sr_matmul(a, b, rnd).double().add_(bias.double()))


def _sum_instr(mode, low, x, dim=None, keepdim=False, dtype=None):
    if low != torch.float32 or x.dtype != low or dtype not in (None, low) or x.dim() == 0:
        return NotImplemented
    return red.sr_sum(x, dim, keepdim, mode._rounder(low))


def _mean_instr(mode, low, x, dim=None, keepdim=False, dtype=None):
    total = _sum_instr(mode, low, x, dim, keepdim, dtype)
    if total is NotImplemented:
        return total
    count = x.numel() // max(1, total.numel()) if keepdim or dim else x.numel()
    return mode.round(total.double().div_(count), low)


def _sum_default_instr(mode, low, x, dtype=None):
    return _sum_instr(mode, low, x, None, False, dtype)


def _mean_default_instr(mode, low, x, dtype=None):
    return _mean_instr(mode, low, x, None, False, dtype)


_SPECIAL = {
    ("op", aten.convolution.default): _conv_op,
    ("op", aten.convolution_backward.default): _conv_backward_op,
    ("instruction", aten.convolution.default): _conv_instr,
    ("instruction", aten.convolution_backward.default): _conv_backward_instr,
    ("instruction", aten.mm.default): _mm_instr,
    ("instruction", aten.bmm.default): _bmm_instr,
    ("instruction", aten.addmm.default): _addmm_instr,
    ("instruction", aten.sum.dim_IntList): _sum_instr,
    ("instruction", aten.sum.default): _sum_default_instr,
    ("instruction", aten.mean.dim): _mean_instr,
    ("instruction", aten.mean.default): _mean_default_instr,
}

#: The aten ops that run per instruction under ``granularity="instruction"`` (all others: one rounding per op).
INSTRUCTION_LEVEL_OPS = tuple(sorted(str(f) for g, f in _SPECIAL if g == "instruction"))
