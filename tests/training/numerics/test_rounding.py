"""Rounding of one result (``nnunet_varaug.training.numerics.rounding``) against plain-Python oracles: stochastic
rounding's probabilities and edge rules, and Verificarlo's random rounding ``rr`` at t bits (exact results kept,
others noised with its formula)."""
from __future__ import annotations

import math
import struct

import pytest
import torch

from nnunet_varaug.training.numerics import MonteCarloArithmetic
from nnunet_varaug.training.numerics.rounding import random_round, representable, stochastic_round

pytestmark = pytest.mark.unit


def _f32(v: float) -> float:
    """Round-to-nearest float32 of a Python float (struct packs with a C (float) cast)."""
    return struct.unpack("f", struct.pack("f", v))[0]


def _verificarlo_rr(x: float, t: int, w0: int, w1: int) -> float:
    """Verificarlo's rr at t bits of the float64 x (interflop_mca.c: _MUST_NOT_BE_NOISED, _INEXACT,
    _noise_binary64), with xi = m 2^-52 - 1/2, m = 2k + 1 odd, k = the 51 bits (w0 & 0x7FFFF, w1); float32 RN."""
    if x == 0 or math.isinf(x) or math.isnan(x):
        return _f32(x)
    mantissa, exponent = math.frexp(abs(x))  # |x| = mantissa 2^exponent, mantissa in [0.5, 1)
    scaled = mantissa * 2.0 ** t  # representable at t bits <=> this is an integer
    if scaled == int(scaled):
        return _f32(x)
    k = ((w0 & 0x7FFFF) << 32) | w1
    xi = (2 * k + 1) * 2.0 ** -52 - 0.5
    e_a = exponent - 1  # Verificarlo's GET_EXP_FLT: floor(log2 |x|)
    return _f32(x + xi * 2.0 ** (e_a - (t - 1)))


def test_random_rounding_keeps_results_representable_at_t_bits():
    """At t = 16, values with at most 16 significant bits times 1.0, sums of small integers and 0.5 * 2.0 come back
    bitwise unchanged (Verificarlo: "In Random Round mode, the exact operations in given virtual precision are
    preserved"); a product with more than 16 bits is perturbed in most elements."""
    g = torch.Generator().manual_seed(0)
    sixteen = (torch.randint(-(1 << 15), 1 << 15, (50_000,), generator=g).double()
               * torch.exp2(torch.randint(-40, 40, (50_000,), generator=g).double())).float()
    ints = torch.randint(-1000, 1000, (50_000,), generator=g).float()
    with MonteCarloArithmetic(16, stream=1):
        times_one = sixteen * 1.0
        int_sum = ints + ints.flip(0)
        half_times_two = torch.full((1000,), 0.5) * 2.0
        inexact = sixteen * 1.1
    assert torch.equal(times_one, sixteen) and torch.equal(int_sum, ints + ints.flip(0))
    assert torch.equal(half_times_two, torch.ones(1000))
    exact = sixteen.double() * float(torch.tensor(1.1))
    perturbed = (inexact.double() != exact.float().double()) & ~representable(exact, 16)
    assert perturbed.double().mean() > 0.9


@pytest.mark.parametrize("t", [16, 8, 3])
def test_random_rounding_follows_verificarlo_formula(t):
    """random_round equals a plain-Python transcription of Verificarlo's rr, value by value, for random words and
    for the extreme words (xi = +-(1/2 - 2^-52)), on values of every binade float32 holds."""
    g = torch.Generator().manual_seed(t)
    x = torch.randn(4000, generator=g, dtype=torch.float64) * torch.exp2(torch.randint(-120, 120, (4000,), generator=g)
                                                                         .double())
    x[:4] = torch.tensor([0.0, 1.0, float("inf"), 3.0 * 2.0 ** -10])
    for words in (torch.randint(0, 1 << 32, (4000, 2), generator=g), torch.full((4000, 2), (1 << 32) - 1),
                  torch.zeros((4000, 2), dtype=torch.int64)):
        got = random_round(x, torch.float32, t, words).tolist()
        want = [_verificarlo_rr(v, t, int(a), int(b)) for v, (a, b) in zip(x.tolist(), words.tolist())]
        assert got == want


def test_stochastic_round_direct():
    """stochastic_round on float64 values k/8 ulp above a float32 with uniform words: only the two neighbours,
    with shares k/8 within the binomial 99.9 % bound."""
    n = 40_000
    base = torch.full((n,), 1.5, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    for k in (0, 2, 7):
        r = stochastic_round(base + k / 8 * 2.0 ** -23, torch.float32, torch.randint(0, 1 << 32, (n,), generator=g))
        up = (r.double() == 1.5 + 2.0 ** -23)
        assert torch.all(up | (r == 1.5))
        assert abs(up.double().mean().item() - k / 8) <= 3.29 * math.sqrt(max(k / 8 * (1 - k / 8), 1e-9) / n)
    with pytest.raises(TypeError, match="expected a torch.float64"):
        stochastic_round(torch.ones(3), torch.float32, torch.zeros(3, dtype=torch.int64))
