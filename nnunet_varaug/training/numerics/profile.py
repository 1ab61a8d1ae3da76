"""Per-op profile of the dispatch mode (the one job of this module): time, values rounded and route of each aten
op, and a count of the additions an op rounded only once.

``mode.profile = {}`` turns it on. For each aten op it records ``calls``, ``seconds`` (CPU time of the process,
so that other jobs on the machine do not count), ``rounded`` (values rounded: results at op level, instructions
at instruction level), ``routes`` (how many calls took each route: ``instruction`` or ``op`` (the special routes
of :mod:`.routes`), ``fused`` (:mod:`.fused`), ``generic`` (one rounding of PyTorch's float64 result)) and
``once``: for generic-route calls of ops that are not element-wise (:func:`elementwise`), the floating-point
input values minus output values, an estimate of the additions (and multiply-adds) done inside the op and
rounded only once. :func:`summary` totals them.
"""
from __future__ import annotations

import time
from typing import Any, Dict

import torch
from torch.utils._pytree import tree_flatten

from nnunet_varaug.training.numerics.dtypes import FLOATING, is_pointwise

#: Element-wise ops PyTorch does not tag ``pointwise``: one result per element, no reduction inside.
ELEMENTWISE = frozenset({"leaky_relu_backward", "threshold_backward", "sigmoid_backward", "tanh_backward",
                         "gelu_backward", "silu_backward", "hardtanh_backward", "elu_backward", "softplus_backward",
                         "hardswish_backward", "hardsigmoid_backward", "mish_backward"})


def elementwise(func) -> bool:
    """Whether the op computes each result element from the same element of its inputs (no reduction)."""
    name = func.overloadpacket.__name__.rstrip("_")
    return is_pointwise(func) or name in ELEMENTWISE or (name.startswith("_foreach_") and name != "_foreach_norm")


def _floating_values(tree: Any) -> int:
    flat, _ = tree_flatten(tree)
    return sum(t.numel() for t in flat if isinstance(t, torch.Tensor) and t.dtype in FLOATING)


def record(mode, func, args, kwargs):
    """Dispatch ``func`` through ``mode`` and add its time, roundings and route to ``mode.profile``."""
    before = mode.rounder.elements
    mode.route = None
    start = time.process_time()
    out = mode._dispatch(func, args, kwargs)
    seconds = time.process_time() - start
    entry = mode.profile.setdefault(str(func), {"calls": 0, "seconds": 0.0, "rounded": 0, "once": 0,
                                                "routes": {}})
    entry["calls"] += 1
    entry["seconds"] += seconds
    entry["rounded"] += mode.rounder.elements - before
    route = mode.route or "not rounded"
    entry["routes"][route] = entry["routes"].get(route, 0) + 1
    if route == "generic" and not elementwise(func):
        entry["once"] += max(0, _floating_values((args, kwargs)) - _floating_values(out))
    return out


def summary(profile: Dict[str, Dict[str, Any]]) -> Dict[str, float]:
    """Totals of a profile: seconds, values rounded, additions rounded once, and their share of all
    rounded values plus additions rounded once."""
    rounded = sum(e["rounded"] for e in profile.values())
    once = sum(e["once"] for e in profile.values())
    return {"seconds": sum(e["seconds"] for e in profile.values()), "rounded": rounded, "once": once,
            "once_share": once / max(1, rounded + once)}
