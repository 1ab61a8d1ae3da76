"""Which aten ops round (the one job of this module): the list of exact ops and each op's dispatch plan.

An op is perturbed when it is an ``aten`` op that is not a view, not in :data:`NO_ROUNDING`, and writes or
returns a tensor; a few ops are arithmetic only in some calls (:data:`_ARITHMETIC_WHEN`). Verificarlo likewise
instruments arithmetic (+ - * / and what is built of them), not moves, casts or comparisons.
"""
from __future__ import annotations

from typing import Any, Dict, NamedTuple, Tuple

#: Aten ops (overload packet names, without a trailing in-place ``_``) whose result involves no rounding, so the
#: mode leaves them alone. Views and other ops that return an alias of an input are skipped through their schema.
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


class Plan(NamedTuple):
    perturb: bool
    writes: Tuple[Tuple[int, str], ...]  # (position, name) of mutated arguments; empty -> perturb the returns
    fresh_returns: Tuple[int, ...]       # indices of returns that are new tensors (no alias of an input)
    condition: Any                       # None, or f(args, kwargs) -> bool deciding at call time


def _base_name(func) -> str:
    name = func.overloadpacket.__name__
    return name[:-1] if name.endswith("_") and not name.endswith("__") else name


def _make_plan(func) -> Plan:
    name = _base_name(func)
    schema = func._schema
    if func.namespace != "aten" or name in NO_ROUNDING or func.is_view:
        return Plan(False, (), (), None)
    writes = tuple((i, a.name) for i, a in enumerate(schema.arguments)
                   if a.alias_info is not None and a.alias_info.is_write)
    fresh = tuple(i for i, r in enumerate(schema.returns) if r.alias_info is None)
    if not writes and not fresh:
        return Plan(False, (), (), None)
    condition = _ARITHMETIC_WHEN.get(name)
    if name == "scatter" and "reduce" in func._overloadname:
        condition = None
    return Plan(True, writes, fresh, condition)


_PLANS: Dict[Any, Plan] = {}


def plan_for(func) -> Plan:
    """The cached dispatch plan of aten op ``func``."""
    plan = _PLANS.get(func)
    if plan is None:
        plan = _PLANS[func] = _make_plan(func)
    return plan


def is_perturbed(func) -> bool:
    """Whether :class:`MonteCarloArithmetic` perturbs the floating-point results of aten op ``func`` (an
    ``OpOverload``, e.g. ``torch.ops.aten.mul.Tensor``); argument-dependent ops count as perturbed."""
    return plan_for(func).perturb


