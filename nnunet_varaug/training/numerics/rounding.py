"""Rounding of a high-precision result to its working dtype with given random words (the one job of this module).

Every perturbed result reaches this module as a tensor of the *high* dtype (float64 for float32 work, float32
for float16/bfloat16 work) holding the op's result computed in that precision, with the random words that
:mod:`.noise` assigns to it, and leaves it as a tensor of the *working* dtype. These are the reference (pure
PyTorch, any device) implementations; :mod:`.kernels` computes the same bits faster on the CPU.

* ``t == p`` (the working dtype's own precision; ``_mca<K>``): **stochastic rounding** (SR). A value x between
  the two neighbouring working-dtype values ``lo < x < hi`` becomes ``hi`` with probability
  ``floor(2^q (x - lo) / (hi - lo)) / 2^q`` and ``lo`` otherwise, with ``q = P_high - p`` (29 for float32):
  the probability of the exact result quantised to 2^-q. Values the working dtype represents are returned
  unchanged. On the bits: the q low significand bits of the high value are that scaled distance, so adding the
  random word's low q bits and clearing them rounds the magnitude up with exactly that probability (a carry into
  the exponent is the next binade). Where the working dtype is subnormal (float32: |x| < 2^-126) the same
  probability is computed on its fixed grid (2^-149 for float32), so subnormal results are stochastically
  rounded too.
* ``t < p`` (``_t<T>``): Verificarlo's **random rounding** ``rr`` at virtual precision t, as its MCA backend
  does it (verificarlo/verificarlo ``src/backends/interflop-mca/interflop_mca.c``: ``_MUST_NOT_BE_NOISED``,
  ``_INEXACT`` and ``_noise_binary64``, used by ``_mca_binary32_binary_op``; representability from
  ``_is_representable_binary64`` in ``src/common/float_utils.h``): a result x that is zero, infinite, NaN, or
  **representable with t significant bits is left unchanged**; any other x becomes
  ``x + 2^(e_x - (t - 1)) * xi`` in float64 (e_x: x's unbiased float64 exponent; xi = ``m 2^-52 - 1/2`` with m
  an odd 52-bit integer, the value of Verificarlo's ``tinymt64_generate_doubleOO() - 0.5``; here m = 2k + 1 with
  k the 51 low bits of two random words), then rounded to nearest into the working dtype. float16 and bfloat16
  results are treated the same way in float64.

Rules at the edges, chosen and stated: **overflow** under SR takes infinity as the neighbour above the largest
finite value, i.e. a result between FLT_MAX and 2^128 becomes ±inf with probability
(|x| - FLT_MAX) / ulp(FLT_MAX) and ±FLT_MAX otherwise; |x| >= 2^128 is ±inf (for ``_t<T>``, the final
round-to-nearest conversion decides, as in Verificarlo). Zeros (with their sign), infinities and **NaN** pass
unchanged; a NaN stays a NaN whatever its payload.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional

import torch

#: Precision p (significand bits, implicit bit included) of each floating-point dtype.
PRECISION: Dict[torch.dtype, int] = {torch.float64: 53, torch.float32: 24, torch.float16: 11, torch.bfloat16: 8}

#: The dtype in which a perturbed op of each working dtype is computed before it is rounded.
HIGH: Dict[torch.dtype, torch.dtype] = {torch.float32: torch.float64, torch.float16: torch.float32,
                                        torch.bfloat16: torch.float32}

#: The exponent of the smallest normal number of each working dtype.
MIN_EXPONENT: Dict[torch.dtype, int] = {torch.float32: -126, torch.float16: -14, torch.bfloat16: -126}


class _Bits(NamedTuple):
    int_dtype: torch.dtype
    mantissa_bits: int
    exponent_all_ones: int


_BITS = {torch.float64: _Bits(torch.int64, 52, 0x7FF), torch.float32: _Bits(torch.int32, 23, 0xFF)}


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


def words_per_rounding(dtype: torch.dtype, virtual_bits: Optional[int]) -> int:
    """Random 32-bit words one rounding takes: 1 for SR (its q <= 29 low bits), 2 for random rounding (51 bits)."""
    return 1 if check_virtual_bits(virtual_bits, dtype) == PRECISION[dtype] else 2


def _exponent_field(high: torch.Tensor) -> torch.Tensor:
    bits = _BITS[high.dtype]
    return (high.view(bits.int_dtype) >> bits.mantissa_bits) & bits.exponent_all_ones


def stochastic_round(high: torch.Tensor, dtype: torch.dtype, words: torch.Tensor) -> torch.Tensor:
    """SR of ``high`` (of dtype ``HIGH[dtype]``) to ``dtype`` with one random word per element (module doc).

    Args:
        high: the op's result in the high dtype (not modified).
        dtype: the working dtype to round to.
        words: int64 tensor of ``high.numel()`` values in [0, 2^32), in ``high``'s row-major element order.
    """
    hdt = high.dtype
    if hdt != HIGH.get(dtype):
        raise TypeError(f"stochastic_round: expected a {HIGH.get(dtype)} result for {dtype}, got {hdt}")
    if high.numel() == 0:
        return high.to(dtype)
    bits = _BITS[hdt]
    q = PRECISION[hdt] - PRECISION[dtype]
    mask = (1 << q) - 1
    high = high.contiguous()
    u = words.reshape(high.shape) & mask
    ints = high.view(bits.int_dtype)
    exponent = _exponent_field(high)
    bias = (1 << (bits.exponent_all_ones.bit_length() - 1)) - 1
    emin = MIN_EXPONENT[dtype]
    normal = exponent >= emin + bias
    rounded = ((ints.to(torch.int64) + u) & ~mask).to(bits.int_dtype).view(hdt)
    # the working dtype's subnormal range: the same probability on its fixed grid 2^(emin - p + 1)
    scale = 2.0 ** (PRECISION[dtype] - 1 - emin)
    s = high.abs().double() * scale
    whole = s.floor()
    threshold = ((s - whole) * 2.0 ** q).floor().to(torch.int64)
    up = (u + threshold) >> q
    sub = ((whole + up.double()) / scale).copysign(high.double()).to(hdt)
    special = exponent == bits.exponent_all_ones  # inf and NaN, whatever the payload
    out = torch.where(normal, rounded, sub)
    return torch.where(special, high, out).to(dtype)


def representable(high: torch.Tensor, t: int) -> torch.Tensor:
    """Whether each float64 value has at most t significant bits (Verificarlo's ``_is_representable_binary64``:
    the 52 - (t - 1) low stored significand bits are zero)."""
    low_bits = 53 - t
    return (high.view(torch.int64) & ((1 << low_bits) - 1)) == 0


def random_round(high: torch.Tensor, dtype: torch.dtype, t: int, words: torch.Tensor) -> torch.Tensor:
    """Verificarlo's random rounding ``rr`` at t bits of ``high`` to ``dtype`` with two words per element.

    Args:
        high: the op's result in ``HIGH[dtype]`` (not modified).
        dtype: the working dtype.
        t: the virtual precision, 1 <= t < PRECISION[dtype].
        words: int64 tensor (numel, 2) of values in [0, 2^32).
    """
    if high.dtype != HIGH.get(dtype):
        raise TypeError(f"random_round: expected a {HIGH.get(dtype)} result for {dtype}, got {high.dtype}")
    x = high.contiguous().double()
    if x.numel() == 0:
        return x.to(dtype)
    words = words.reshape(-1, 2)
    k = ((words[:, 0] & 0x7FFFF) << 32) | words[:, 1]
    xi = ((2 * k + 1 - (1 << 51)).double() * 2.0 ** -52).view(x.shape)
    exponent = _exponent_field(x)
    noise = torch.ldexp(xi, exponent - 1023 - (t - 1))
    keep = (exponent == 0x7FF) | (x == 0) | representable(x, t)
    return torch.where(keep, x, x + noise).to(dtype)
