"""Mixed dtypes and edge values under ``MonteCarloArithmetic``: PyTorch's result dtypes, 0-dim float64 operands cast
to float32 first, float results of integer inputs rounded, the overflow rule, subnormal results and NaN payloads,
each against a plain-Python or numpy oracle with directed random words."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from numerics_oracle import FLT_MAX, directed32, f32

from nnunet_varaug.training.numerics import MonteCarloArithmetic, stochastic_round
from nnunet_varaug.training.numerics import kernels

pytestmark = pytest.mark.unit


def _directed16(x: float, up: bool) -> float:
    """Directed rounding of an exact double to float16 (numpy), away from / towards zero."""
    y = float(np.float16(x))
    if y == x:
        return y
    towards = np.float16(0) if abs(y) > abs(x) else np.float16(math.copysign(np.inf, x))
    lo, hi = sorted((y, float(np.nextafter(np.float16(y), towards))), key=abs)
    return hi if up else lo


@pytest.mark.parametrize("direction", ["up", "down"])
def test_half_tensor_times_float32_zero_dim_stays_half(direction):
    """float16 * 0-dim float32 is float16 (PyTorch's promotion), computed in float32 from the float32 scalar as
    PyTorch's CPU kernel computes it (its opmath type; the float32 product of a 24-bit scalar is rounded to
    nearest, the documented limit of half-precision work) and then rounded to float16."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, generator=g).to(torch.float16)
    scalar = torch.tensor(0.1)
    with MonteCarloArithmetic(directed=direction):
        y = x * scalar
    assert y.dtype == torch.float16 == (x * scalar).dtype
    want = [_directed16(f32(v * float(scalar)), direction == "up") for v in x.tolist()]
    assert y.tolist() == want


@pytest.mark.parametrize("direction", ["up", "down"])
def test_zero_dim_float64_is_cast_to_float32_first(direction):
    """float32 * 0-dim float64 (0.1) is float32 and rounds the exact product with float32(0.1), as PyTorch's
    kernel casts the 0-dim operand to the common dtype first; with 0.1 itself the results would differ."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2000, generator=g)
    with MonteCarloArithmetic(directed=direction):
        y = x * torch.tensor(0.1, dtype=torch.float64)
    assert y.dtype == torch.float32
    up = direction == "up"
    assert y.tolist() == [directed32(v * f32(0.1), up) for v in x.tolist()]
    assert y.tolist() != [directed32(v * 0.1, up) for v in x.tolist()]


@pytest.mark.parametrize("direction", ["up", "down"])
def test_float_results_of_integer_inputs_are_rounded(direction):
    """int * 0.1 and int / 3 are float32 results: rounded (directed), from the integers cast to float32."""
    i = torch.arange(1, 3001) * 7919
    up = direction == "up"
    with MonteCarloArithmetic(directed=direction):
        times, quotient = i * 0.1, i / 3
    assert times.dtype == quotient.dtype == torch.float32
    assert times.tolist() == [directed32(f32(v) * f32(0.1), up) for v in i.tolist()]
    assert quotient.tolist() == [directed32(f32(v) / 3, up) for v in i.tolist()]
    assert times.tolist() != (i * 0.1).tolist()  # not left at round to nearest


def test_overflow_rule_and_subnormal_results():
    """Above FLT_MAX the upper neighbour is infinity: FLT_MAX + ulp/4 overflows with probability 1/4 (binomial
    99.9 % bound), 2^128 always; subnormal results are stochastically rounded on their grid: 2^-149 * 5/4 rounds
    up to 2 * 2^-149 with probability 1/4."""
    n = 40_000
    bound = 3.29 * math.sqrt(0.25 * 0.75 / n)
    with MonteCarloArithmetic(stream=2):
        big = torch.full((n,), FLT_MAX) + torch.full((n,), 2.0 ** 102)
        huge = torch.full((10,), FLT_MAX) * 2.0
        tiny = torch.full((n,), 2.0 ** -149) * 1.25
    assert torch.all(torch.isinf(big) | (big == FLT_MAX)) and abs(torch.isinf(big).double().mean() - 0.25) <= bound
    assert torch.all(torch.isinf(huge))
    up = tiny == 2.0 ** -148
    assert torch.all(up | (tiny == 2.0 ** -149)) and abs(up.double().mean() - 0.25) <= bound
    with MonteCarloArithmetic(directed="down"):
        assert torch.equal(torch.full((3,), FLT_MAX) + 2.0 ** 103, torch.full((3,), FLT_MAX))


@pytest.mark.parametrize("compiled", [False, True])
def test_nan_payloads_stay_nan(compiled):
    """float64 NaNs whose payload lies in the low bits that stochastic rounding clears stay NaN (not inf)."""
    if compiled and kernels.library() is None:
        pytest.skip(kernels.status())
    bits = torch.tensor([0x7FF0000000000001, 0xFFF0000010000000 - (1 << 64), 0x7FF8000000000001, 0x7FF0000000000000])
    high = bits.view(torch.float64)
    for up in (True, False):
        words = torch.full((4,), 0xFFFFFFFF if up else 0)
        if compiled:
            out = kernels.round_f32(high, 24, (0, 0), 0, 0, 1 if up else 2, 0)
        else:
            out = stochastic_round(high, torch.float32, words)
        assert torch.isnan(out[:3]).all() and out[3] == math.inf
