"""Monte Carlo Arithmetic (MCA) random rounding inside PyTorch, on the CPU and the GPU.

The paper's numerical replicas come from Verificarlo-built "Fuzzy PyTorch", which replaces every floating-point
instruction by its MCA counterpart (CPU only, days per training run). Here the same perturbation is applied at
the level of PyTorch's operators: :class:`MonteCarloArithmetic` is a ``TorchDispatchMode`` under which the result
of every floating-point aten op (forward, autograd's backward ops and the optimizer's ``_foreach`` ops alike) is
randomly rounded at a virtual precision of ``t`` bits::

    x -> x + 2^(e_x - t) * xi,   xi ~ U(-1/2, 1/2),   e_x = floor(log2 |x|) + 1

Because PyTorch hands us the op's result already rounded to nearest, ``y = fl(x)``, the noisy value ``y + noise``
is itself rounded *stochastically* (without bias) back to the tensor's dtype, exactly as Verificarlo rounds the
exact ``x + noise``. For ``t`` below the dtype's precision ``p`` the float addition ``y + 2^(e_x - t) * xi`` does
this by itself (its round-to-nearest of a uniform offset is the stochastic rounding of that offset); for
``t == p`` stochastic rounding of ``y + ulp(y) * xi`` gives ``y +- ulp(y)`` with probability 1/8 each, which is
round-to-nearest of ``y + ulp(y) * xi'`` with ``xi' ~ U(-2/3, 2/3)``, so that case widens xi by 4/3. Either way
the result stays within ``2^(1 - t) |y|`` of ``y`` and its mean is ``y`` (up to the binade edges, where the grid
spacing halves).

The noise costs four vectorised kernels per result (one 64-bit random draw per four values, exponent mask,
clamp, fused multiply-add), computed in place on the op's output; xi has 16 random bits, so rounding
probabilities are exact to 2^-16. It comes from the mode's own ``torch.Generator`` per device: the global RNG, and
therefore everything seeded by nnU-Net or ``seeding``, is never touched.

Not perturbed: zeros, subnormals, infinities and NaN (the exponent mask gives them no or harmless noise);
integer and boolean results; non-strided (sparse) tensors; complex dtypes; and ops that do no rounding, listed
in :data:`NO_ROUNDING` (views, copies and dtype conversions, creation, fills and random draws, concatenation,
indexing, padding and selection, and the exact ops ``neg``, ``abs``, ``relu``, ``max``/``min``/``clamp`` ...).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, Iterator, NamedTuple, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nnunet_varaug.seeding import derive_seed

#: Precision p (significand bits, implicit bit included) of each perturbed floating-point dtype.
PRECISION: Dict[torch.dtype, int] = {torch.float64: 53, torch.float32: 24, torch.float16: 11, torch.bfloat16: 8}

#: Aten ops (overload packet names, without a trailing in-place ``_``) whose result involves no rounding, so MCA
#: leaves it alone. Verificarlo likewise instruments arithmetic (+ - * / and what is built of them), not moves,
#: casts or comparisons. Views and other ops that return an alias of an input are skipped through their schema.
NO_ROUNDING = frozenset({
    # copies, moves and dtype conversions (casts are not instrumented by Verificarlo either)
    "clone", "copy", "_to_copy", "_copy_from", "_copy_from_and_resize", "to", "contiguous", "lift", "lift_fresh",
    "lift_fresh_copy", "detach", "detach_copy", "alias", "alias_copy", "view_copy", "_unsafe_view", "t_copy",
    "permute_copy", "expand_copy", "transpose_copy", "unsqueeze_copy", "squeeze_copy", "slice_copy",
    "select_copy", "narrow_copy", "split_copy", "split_with_sizes_copy", "unbind_copy", "as_strided_copy",
    "_foreach_copy", "set", "resize", "resize_as", "_local_scalar_dense", "_pin_memory", "_to_dense",
    "slice_backward", "select_backward", "diagonal_backward",  # zeros with the gradient copied into a slice
    # creation, fills, random draws
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "zeros", "zeros_like", "new_zeros",
    "ones", "ones_like", "new_ones", "full", "full_like", "new_full", "scalar_tensor", "fill", "zero",
    "_foreach_zero", "arange", "eye", "rand", "rand_like", "randn", "randn_like", "randint", "randint_like",
    "randperm", "normal", "uniform", "bernoulli", "random", "exponential", "cauchy", "log_normal", "geometric",
    # concatenation, layout, indexing, padding (values are copied, not computed)
    "cat", "stack", "flip", "roll", "repeat", "constant_pad_nd", "reflection_pad1d", "reflection_pad2d",
    "reflection_pad3d", "replication_pad1d", "replication_pad2d", "replication_pad3d", "index", "_unsafe_index",
    "index_select", "gather", "take", "masked_select", "masked_fill", "masked_scatter", "where", "slice_scatter",
    "select_scatter", "diagonal_scatter", "as_strided_scatter", "im2col", "pixel_shuffle", "pixel_unshuffle",
    "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "_upsample_nearest_exact1d",
    "_upsample_nearest_exact2d", "_upsample_nearest_exact3d",
    # exact results: selections and sign manipulations
    "neg", "abs", "sign", "sgn", "relu", "threshold", "threshold_backward", "max", "min", "amax", "amin",
    "maximum", "minimum", "fmax", "fmin", "clamp", "clamp_min", "clamp_max", "hardtanh", "sort", "topk",
    "kthvalue", "median", "nanmedian", "mode", "max_pool1d", "max_pool2d", "max_pool3d",
    "max_pool2d_with_indices", "max_pool3d_with_indices", "floor", "ceil", "trunc", "round", "_foreach_neg",
    "_foreach_abs", "_foreach_maximum", "_foreach_minimum", "_foreach_clamp_min", "_foreach_clamp_max",
})

#: Ops that are pure writes in some overloads and arithmetic in others (``index_put(accumulate=True)``,
#: ``scatter(reduce=...)``, ``scatter_add``): perturbed only when they accumulate.
_ARITHMETIC_WHEN = {
    "index_put": lambda args, kwargs: bool(kwargs.get("accumulate", args[3] if len(args) > 3 else False)),
    "_index_put_impl": lambda args, kwargs: bool(kwargs.get("accumulate", args[3] if len(args) > 3 else False)),
    "scatter": lambda args, kwargs: "reduce" in kwargs or len(args) > 4,
}


class PrecisionError(ValueError):
    """A virtual precision t that the dtype cannot carry (t > its precision) or that is not >= 1."""


def check_virtual_bits(virtual_bits: Optional[int], dtype: torch.dtype = torch.float32) -> int:
    """The virtual precision that applies to ``dtype``: ``virtual_bits``, or the dtype's own precision if None.

    Raises:
        PrecisionError: ``virtual_bits`` < 1, or larger than the precision of ``dtype`` (random rounding
            cannot make a float32 more precise than its 24 bits).
    """
    if dtype not in PRECISION:
        raise PrecisionError(f"MCA supports {', '.join(str(d) for d in PRECISION)}, not {dtype}")
    p = PRECISION[dtype]
    if virtual_bits is None:
        return p
    t = int(virtual_bits)
    if t < 1:
        raise PrecisionError(f"virtual precision t={t} must be at least 1 bit")
    if t > p:
        name = str(dtype).replace("torch.", "")
        raise PrecisionError(f"virtual precision t={t} exceeds the {p} bits of {name}: MCA can only lower "
                             f"precision; use t <= {p} (t={p} is {name}'s own precision)")
    return t


class _Format(NamedTuple):
    int_dtype: torch.dtype
    exponent_mask: int   # bits of the exponent field: (bits & mask) is 2^floor(log2|x|) as a float
    largest_exponent: int  # the exponent field of the largest finite binade (inf/NaN are clamped to it)


_FORMATS = {
    torch.float64: _Format(torch.int64, 0x7FF0000000000000, 0x7FE0000000000000),
    torch.float32: _Format(torch.int32, 0x7F800000, 0x7F000000),
    torch.float16: _Format(torch.int16, 0x7C00, 0x7800),
    torch.bfloat16: _Format(torch.int16, 0x7F80, 0x7F00),
}


class _Plan(NamedTuple):
    perturb: bool
    writes: Tuple[Tuple[int, str], ...]  # (position, name) of mutated arguments; empty -> perturb the returns
    fresh_returns: Tuple[int, ...]       # indices of returns that are new tensors (no alias of an input)
    condition: Any                       # None, or f(args, kwargs) -> bool deciding at call time


def _base_name(func) -> str:
    name = func.overloadpacket.__name__
    return name[:-1] if name.endswith("_") and not name.endswith("__") else name


def _make_plan(func) -> _Plan:
    name = _base_name(func)
    schema = func._schema
    if func.namespace != "aten" or name in NO_ROUNDING or func.is_view:
        return _Plan(False, (), (), None)
    writes = tuple((i, a.name) for i, a in enumerate(schema.arguments)
                   if a.alias_info is not None and a.alias_info.is_write)
    fresh = tuple(i for i, r in enumerate(schema.returns) if r.alias_info is None)
    if not writes and not fresh:
        return _Plan(False, (), (), None)
    condition = _ARITHMETIC_WHEN.get(name)
    if name == "scatter" and "reduce" in func._overloadname:
        condition = None
    return _Plan(True, writes, fresh, condition)


_PLANS: Dict[Any, _Plan] = {}


def is_perturbed(func) -> bool:
    """Whether :class:`MonteCarloArithmetic` perturbs the floating-point results of aten op ``func`` (an
    ``OpOverload``, e.g. ``torch.ops.aten.mul.Tensor``); argument-dependent ops count as perturbed."""
    plan = _PLANS.get(func)
    if plan is None:
        plan = _PLANS[func] = _make_plan(func)
    return plan.perturb


def _tensors(value) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            if isinstance(v, torch.Tensor):
                yield v


class MonteCarloArithmetic(TorchDispatchMode):
    """Perturb every floating-point aten result by MCA random rounding at ``virtual_bits`` bits while active.

    Example::

        mca = MonteCarloArithmetic(virtual_bits=None, stream=3)   # each dtype at its own precision
        with mca:
            loss = model(x).sum()
            loss.backward()          # backward ops run under the mode too
            optimizer.step()

    Args:
        virtual_bits: t; None means each dtype's own precision (24 for float32, 53 for float64, 11 for float16,
            8 for bfloat16). An explicit t applies to every floating dtype; a result whose dtype has fewer than t
            bits raises :class:`PrecisionError`.
        stream: noise stream index; equal streams give bitwise-equal noise, different streams independent noise.
        seed: overrides the generator seed derived from ``stream``.

    The mode keeps one ``torch.Generator`` per device, seeded from (stream, device); :meth:`reseed` restarts
    them (e.g. per epoch, so that a resumed training run draws the same noise as a fresh one).
    """

    def __init__(self, virtual_bits: Optional[int] = None, stream: int = 0, seed: Optional[int] = None):
        super().__init__()
        if virtual_bits is not None:
            virtual_bits = int(virtual_bits)
            if not 1 <= virtual_bits <= max(PRECISION.values()):
                raise PrecisionError(f"virtual precision t={virtual_bits} must be in 1..{max(PRECISION.values())}")
        self.virtual_bits = virtual_bits
        self.stream = int(stream)
        self._seed = derive_seed("mca", self.stream) if seed is None else int(seed)
        self._generators: Dict[torch.device, torch.Generator] = {}
        self._scales: Dict[torch.dtype, float] = {}
        self.perturbed_ops = 0
        self.perturbed_elements = 0

    def __repr__(self) -> str:
        bits = "dtype precision" if self.virtual_bits is None else self.virtual_bits
        return f"MonteCarloArithmetic(virtual_bits={bits}, stream={self.stream})"

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

    def _scale(self, dtype: torch.dtype) -> float:
        """The factor that turns (16-bit random integer) x (2^floor(log2|x|)) into the noise of this dtype.

        xi = r / 2^16 with r uniform on the int16 range; 2^(e_x - t) = 2^floor(log2|x|) * 2^(1 - t); at t == p
        xi is widened by 4/3 (module docstring). The factor (1 + 2^-20) keeps every noise value off the exact
        midpoints between representable numbers, so that round-to-nearest never meets a tie and the
        rounding-up and rounding-down probabilities are exactly equal.
        """
        scale = self._scales.get(dtype)
        if scale is None:
            t = check_virtual_bits(self.virtual_bits, dtype)
            scale = math.ldexp(1.0 + 2.0 ** -20, 1 - t - 16) * (4.0 / 3.0 if t == PRECISION[dtype] else 1.0)
            self._scales[dtype] = scale
        return scale

    def perturb_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Randomly round ``tensor`` in place (floating dtypes only; anything else is returned unchanged)."""
        fmt = _FORMATS.get(tensor.dtype)
        n = tensor.numel()
        if fmt is None or tensor.layout != torch.strided or n == 0 or tensor.is_meta:
            return tensor
        scale = self._scale(tensor.dtype)
        # One 64-bit draw gives four 16-bit xi: the generator's cost per value is a quarter of uniform_'s.
        words = torch.empty((n + 3) // 4, dtype=torch.int64, device=tensor.device)
        words.random_(-2 ** 63, None, generator=self._generator(tensor.device))
        xi = words.view(torch.int16)[:n].view(tensor.shape)
        # 2^floor(log2|x|) from the exponent bits: 0 for zeros and subnormals; inf/NaN get the largest finite
        # binade instead of inf, so that inf + noise stays inf and NaN stays NaN.
        binade = torch.bitwise_and(tensor.view(fmt.int_dtype), fmt.exponent_mask)
        binade.clamp_max_(fmt.largest_exponent)
        tensor.addcmul_(xi, binade.view(tensor.dtype), value=scale)
        self.perturbed_elements += n
        return tensor

    # ---- dispatch ------------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        plan = _PLANS.get(func)
        if plan is None:
            plan = _PLANS[func] = _make_plan(func)
        if not plan.perturb or (plan.condition is not None and not plan.condition(args, kwargs)):
            return out
        self.perturbed_ops += 1
        if plan.writes:
            for position, name in plan.writes:
                value = args[position] if position < len(args) else kwargs.get(name)
                for t in _tensors(value):
                    self.perturb_(t)
        elif isinstance(out, torch.Tensor):
            self.perturb_(out)
        else:
            returns: Iterable = out if isinstance(out, (tuple, list)) else ()
            if len(plan.fresh_returns) == 1 and isinstance(out, list):  # one list return (e.g. _foreach_mul)
                returns = (out,)
            for i in plan.fresh_returns:
                if i < len(returns):
                    for t in _tensors(returns[i]):
                        self.perturb_(t)
        return out
