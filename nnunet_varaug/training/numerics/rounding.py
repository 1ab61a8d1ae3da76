"""Stochastic rounding of a high-precision result to its working dtype (the one job of this module).

Every perturbed result reaches this module as a tensor of the *high* dtype (float64 for float32 work, float32
for float16/bfloat16 work) holding the op's result computed in that precision, and leaves it as a tensor of
the *working* dtype:

* ``t == p`` (the working dtype's own precision; the default): **stochastic rounding** (SR). A value x lying
  between the two neighbouring working-dtype values ``lo < x < hi`` becomes ``hi`` with probability
  ``(x - lo) / (hi - lo)`` and ``lo`` otherwise; a value that the working dtype represents stays exactly as it
  is. It is done on the bits: the ``q = P_high - p`` low significand bits of the high-precision value are the
  distance to ``lo`` (towards zero) in units of ``2^-q`` of the gap, so adding a uniform random integer in
  ``[0, 2^q)`` to the bit pattern and clearing those q bits rounds the magnitude up with probability exactly
  ``low bits / 2^q`` (a carry into the exponent is the next binade, as it should be). q = 29 for float32.
* ``t < p``: Verificarlo's **random rounding at virtual precision t** (its ``rr`` mode), applied to the
  high-precision result x: ``x + 2^(e_x - t) * xi`` with ``xi ~ U(-1/2, 1/2)`` (53 random bits) and
  ``e_x = floor(log2|x|) + 1``, computed in the high dtype, then rounded to nearest into the working dtype.
  At t == p that formula is also stochastic rounding; below p it perturbs exact values too, by design.

Limits, stated exactly: SR's probabilities are exact for the high-precision value; where the working dtype is
subnormal (float32: |x| < 2^-126) or overflows, the final conversion rounds to nearest (there are not p bits
to round to); zeros, infinities and NaN pass unchanged. Random integers come from the caller's
``torch.Generator``; nothing else is drawn from.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional

import torch

#: Precision p (significand bits, implicit bit included) of each floating-point dtype.
PRECISION: Dict[torch.dtype, int] = {torch.float64: 53, torch.float32: 24, torch.float16: 11, torch.bfloat16: 8}

#: The dtype in which a perturbed op of each working dtype is computed before it is rounded.
HIGH: Dict[torch.dtype, torch.dtype] = {torch.float32: torch.float64, torch.float16: torch.float32,
                                        torch.bfloat16: torch.float32}


class _Bits(NamedTuple):
    int_dtype: torch.dtype
    exponent_mask: int     # (bits & mask) viewed as the float is 2^floor(log2|x|)
    largest_exponent: int  # exponent field of the largest finite binade


_BITS = {torch.float64: _Bits(torch.int64, 0x7FF0000000000000, 0x7FE0000000000000),
         torch.float32: _Bits(torch.int32, 0x7F800000, 0x7F000000)}


class PrecisionError(ValueError):
    """A virtual precision t that the dtype cannot carry (t > its precision) or that is not >= 1."""


def check_virtual_bits(virtual_bits: Optional[int], dtype: torch.dtype = torch.float32) -> int:
    """The virtual precision that applies to ``dtype``: ``virtual_bits``, or the dtype's own precision if None.

    Raises:
        PrecisionError: ``dtype`` is not perturbed, ``virtual_bits`` < 1, or larger than the precision of
            ``dtype`` (random rounding cannot make a float32 more precise than its 24 bits).
    """
    if dtype not in HIGH:
        raise PrecisionError(f"stochastic rounding works on {', '.join(str(d) for d in HIGH)}, not {dtype}")
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


def random_low_bits(n: int, q: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """``n`` independent uniform integers in ``[0, 2^q)`` (q <= 31), as int32, two per 64-bit draw."""
    words = torch.empty((n + 1) // 2, dtype=torch.int64, device=device)
    words.random_(-2 ** 63, None, generator=generator)
    return words.view(torch.int32)[:n].bitwise_and_((1 << q) - 1)


def stochastic_round(high: torch.Tensor, dtype: torch.dtype, generator: torch.Generator,
                     virtual_bits: Optional[int] = None) -> torch.Tensor:
    """Round ``high`` (of dtype ``HIGH[dtype]``) to ``dtype``: SR at t == p, Verificarlo's rr below (module doc).

    Args:
        high: the op's result in the high dtype; it may be overwritten (callers pass a temporary).
        dtype: the working dtype to round to.
        generator: the source of random bits (on ``high``'s device).
        virtual_bits: t; None means the working dtype's own precision.
    """
    t = check_virtual_bits(virtual_bits, dtype)
    hdt = high.dtype
    if hdt != HIGH[dtype]:
        raise TypeError(f"stochastic_round: expected a {HIGH[dtype]} result for {dtype}, got {hdt}")
    if high.numel() == 0:
        return high.to(dtype)
    bits = _BITS[hdt]
    high = high.contiguous()
    if t == PRECISION[dtype]:
        q = PRECISION[hdt] - PRECISION[dtype]
        ints = high.view(bits.int_dtype)
        noise = random_low_bits(high.numel(), q, generator, high.device).view(high.shape)
        ints.add_(noise).bitwise_and_(~((1 << q) - 1))
        return high.to(dtype)
    # Verificarlo rr at t < p: x + 2^(e_x - t) * xi in the high dtype, then round to nearest.
    binade = torch.bitwise_and(high.view(bits.int_dtype), bits.exponent_mask)
    binade.clamp_max_(bits.largest_exponent)  # inf/NaN: finite noise, so inf stays inf and NaN stays NaN
    xi = torch.rand(high.shape, dtype=hdt, device=high.device, generator=generator).sub_(0.5)
    return high.addcmul_(xi, binade.view(hdt), value=2.0 ** (1 - t)).to(dtype)
