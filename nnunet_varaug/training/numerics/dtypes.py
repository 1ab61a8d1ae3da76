"""Which dtypes an op's results have and how its inputs enter the high-precision computation (the one job of
this module): PyTorch's own type promotion, read from the op's meta kernel.

* **Result dtypes** are the ones PyTorch gives the op (its meta kernel is run once per signature: op, input
  dtypes, which inputs are 0-dim or Python scalars): a float16 tensor times a 0-dim float32 tensor is float16;
  ``int_tensor * 0.1`` and ``int_tensor / 3`` are float32 and are rounded like any float32 result.
* **Inputs**, as PyTorch's CPU kernels see them: Python floats, and 0-dim floating tensors of another dtype, are
  first rounded to float32 (the computation type of float32, float16 and bfloat16 kernels: a 0-dim float64
  operand of a float32 op is cast to float32, as TensorIterator casts it to the common dtype); integer and
  boolean tensors of pointwise ops are cast to the result dtype (PyTorch casts them to the common dtype; other
  ops' integer tensors are indices, targets or masks and stay as they are); then every floating input is
  widened exactly to the high dtype.
"""
from __future__ import annotations

import struct
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch.utils._pytree import tree_flatten

_CACHE: Dict[Any, Tuple[Optional[torch.dtype], ...]] = {}
FLOATING = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def float32_scalar(v: float) -> float:
    """A Python float rounded to float32 (to nearest), as PyTorch's float32 kernels take a scalar."""
    if v != v or abs(v) >= 3.4028235677973366e38 * (1 + 2 ** -25):
        return v
    return struct.unpack("f", struct.pack("f", v))[0]


def _describe(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return ("T", v.dtype, v.dim() == 0, v.layout, v.device.type)
    if isinstance(v, (bool, int, float, complex)):
        return type(v).__name__
    if isinstance(v, torch.dtype):
        return v
    if isinstance(v, (list, tuple)):
        return tuple(_describe(x) for x in v)
    return None if v is None else type(v).__name__


def _meta(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="meta")
    if isinstance(v, (list, tuple)):
        return type(v)(_meta(x) for x in v)
    if isinstance(v, torch.device):
        return torch.device("meta")
    return v


def _promoted(args, kwargs) -> Optional[torch.dtype]:
    """PyTorch's promotion over floating inputs (dimensioned tensors, then 0-dim tensors, then Python floats)."""
    flat, _ = tree_flatten((args, kwargs))
    for category in ("dim", "zero"):
        dtypes = [t.dtype for t in flat if isinstance(t, torch.Tensor) and t.dtype in FLOATING
                  and (t.dim() > 0) == (category == "dim")]
        if dtypes:
            out = dtypes[0]
            for d in dtypes[1:]:
                out = torch.promote_types(out, d)
            return out
    if any(isinstance(v, float) for v in flat):
        return torch.get_default_dtype()
    return None


def output_dtypes(func, args, kwargs) -> Tuple[Optional[torch.dtype], ...]:
    """The dtype of each tensor the op returns (flattened), None for other returns; cached per signature."""
    key = (func, _describe(args), _describe(kwargs))
    cached = _CACHE.get(key)
    if cached is not None:
        return cached
    try:
        out = func(*_meta(args), **_meta(kwargs))
        flat, _ = tree_flatten(out)
        dtypes = tuple(t.dtype if isinstance(t, torch.Tensor) else None for t in flat)
    except Exception:  # an op without a meta kernel: PyTorch's promotion rule, for every returned tensor
        dtypes = (_promoted(args, kwargs),)
    _CACHE[key] = dtypes
    return dtypes


def is_pointwise(func) -> bool:
    return torch.Tag.pointwise in getattr(func, "tags", ())


def widen(value: Any, high: torch.dtype, low: torch.dtype, pointwise: bool) -> Any:
    """One input as the high-precision computation takes it (module docstring); tensors come back as new
    tensors (or the input itself when nothing changes)."""
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided:
            return value
        if value.dtype in FLOATING:
            if value.dim() == 0 and value.dtype != low and value.dtype.itemsize > 4:
                return value.to(torch.float32).to(high)
            return value.to(high, copy=True)
        if pointwise and (value.dtype == torch.bool or not value.dtype.is_floating_point) \
                and not value.dtype.is_complex:
            return value.to(low).to(high)
        return value
    if isinstance(value, float):
        return float32_scalar(value)
    if isinstance(value, torch.dtype) and value in FLOATING and value != torch.float64:
        return high  # e.g. input_dtype of _log_softmax_backward_data
    return value


def written_dtypes(writes, args, kwargs) -> Tuple[Optional[torch.dtype], ...]:
    """The dtypes of the tensors an in-place or out= op writes (``writes``: (position, name) pairs)."""
    found = []
    for position, name in writes:
        value = args[position] if position < len(args) else kwargs.get(name)
        flat, _ = tree_flatten(value)
        found += [t.dtype for t in flat if isinstance(t, torch.Tensor)]
    return tuple(found)


def floating_outputs(dtypes: Tuple[Optional[torch.dtype], ...]) -> List[torch.dtype]:
    return [d for d in dtypes if d in (torch.float32, torch.float16, torch.bfloat16)]
