"""Stochastic rounding (``nnunet_varaug.training.numerics``), each property against an independent computation: exact
arithmetic (Python floats whose operations are exact by construction), binomial bounds, a plain-Python
per-instruction oracle, and float64 references."""
from __future__ import annotations

import math
import random
import struct

import numpy as np
import pytest
import torch

from nnunet_varaug.training.numerics import (NO_ROUNDING, PRECISION, MonteCarloArithmetic, PrecisionError,
                                             check_virtual_bits, is_perturbed)
from nnunet_varaug.training.numerics.lanes import lanes_for

pytestmark = pytest.mark.unit
aten = torch.ops.aten
GRANULARITIES = ("op", "instruction")


def _operands(n: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = (torch.rand(n, generator=g, dtype=torch.float64) * 4 - 2).to(dtype)
    b = (torch.rand(n, generator=g, dtype=torch.float64) * 4 - 2).to(dtype)
    return a, b


# ---- stochastic rounding: stagnation, exactness, probabilities -------------------------------------------------
def test_sub_half_ulp_additions_do_not_stagnate():
    """4096 additions of 2^-26 (1/8 ulp of 1.0) to 1.0 reach 1 + 2^-14 (exact: 4096 * 2^-26) in the mean over 20
    independent rounding sequences (10 values in each of 2 streams), within 10 %; round to nearest (and noise
    added to a rounded-to-nearest result) stays at 1.0. Element-wise adds are the same code in both granularities."""
    increment = torch.full((10,), 2.0 ** -26)
    finals = []
    for stream in range(2):
        x = torch.ones(10)
        with MonteCarloArithmetic(stream=stream):
            for _ in range(4096):
                x = x + increment
        finals.append(x.double() - 1.0)
    reached = torch.cat(finals).mean().item() / 2.0 ** -14
    assert abs(reached - 1.0) <= 0.10, reached
    x = torch.ones(10)
    for _ in range(4096):
        x = x + increment
    assert torch.equal(x, torch.ones(10))  # the IEEE reference stagnates


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_exact_results_stay_exact(granularity):
    """Results the dtype represents are not perturbed: x * 1.0, x + 0, w.add_(zeros), 2 * x, and a float32 sum of
    two small integers; nor are zeros, infinities, NaN, integers and booleans."""
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(0))
    x[:4] = torch.tensor([1.0, 2.0, 0.5, 4.0])  # powers of two, where a noise-based scheme errs most
    w = x.clone()
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan")])
    ints = torch.randint(-1000, 1000, (1000,), generator=torch.Generator().manual_seed(1)).float()
    with MonteCarloArithmetic(stream=3, granularity=granularity):
        times_one, plus_zero, doubled = x * 1.0, x + 0, 2 * x
        w.add_(torch.zeros_like(w))
        int_sum = ints + ints.flip(0)
        s = special * 1.0
        i = torch.arange(10) * 3
        flags = x > 1
    for got, want in ((times_one, x), (plus_zero, x), (w, x), (doubled, x.double().mul(2).float()),
                      (int_sum, ints + ints.flip(0))):
        assert torch.equal(got, want)
    assert torch.equal(s[:4], special[:4]) and torch.isnan(s[4])
    assert torch.equal(i, torch.arange(10) * 3) and flags.dtype == torch.bool


@pytest.mark.parametrize("numerator", [1, 3, 8, 13])
def test_rounding_up_probability_is_the_distance(numerator):
    """1 + f ulp (f = numerator/16, b = f * 2^-23 exact) rounds up to 1 + 2^-23 with probability f: the share of
    20 000 sums rounded up is within the binomial 99.9 % bound (3.29 sigma) of f, and nothing else occurs."""
    n = 20_000
    f = numerator / 16
    a = torch.ones(n)
    b = torch.full((n,), f * 2.0 ** -23)
    with MonteCarloArithmetic(stream=numerator):
        s = a + b
    up = (s == 1 + 2.0 ** -23)
    assert torch.all(up | (s == 1.0))
    bound = 3.29 * math.sqrt(f * (1 - f) / n)
    assert abs(up.double().mean().item() - f) <= bound


def test_rounding_probability_of_products_against_exact_products():
    """For float32 products (exact in float64), P(round away from the float64 product's lower neighbour) is the
    distance: the mean of the rounded results equals the exact product (unbiased), within 5 standard errors,
    and each result is one of the two float32 neighbours."""
    a, b = _operands(1 << 18)
    exact = a.double() * b.double()
    with MonteCarloArithmetic(stream=1):
        prod = a * b
    err = (prod.double() - exact)
    ulp = torch.from_numpy(np.spacing(np.abs(exact.float().numpy())).astype(np.float64))
    assert torch.all(err.abs() < ulp * 1.0000001)
    rel = (err / ulp).numpy()
    assert abs(rel.mean()) <= 5 * rel.std() / math.sqrt(len(rel))
    # RMS error in ulps: E[f(1-f)] = 1/6 for f uniform, i.e. sqrt(1/6) = 0.41 ulp (round to nearest: 0.29)
    assert 0.38 <= math.sqrt((rel ** 2).mean()) <= 0.44


def test_virtual_precision_below_float32_is_verificarlo_random_rounding():
    """t < 24: inexact products become x + 2^(e_x - (t - 1)) xi in float64, then round to nearest: |relative error|
    <= 2^(1-t) against the exact product, unbiased, and the noise reaches its scale."""
    a, b = _operands(1 << 18)
    exact = a.double() * b.double()
    for t in (20, 12):
        with MonteCarloArithmetic(t, stream=t):
            prod = a * b
        rel = ((prod.double() - exact) / exact).numpy()
        assert np.abs(rel).max() <= 2.0 ** (1 - t)
        assert np.abs(rel).max() > 2.0 ** (-1 - t)
        assert abs(rel.mean()) <= 5 * rel.std() / math.sqrt(len(rel))


# ---- instruction level against a plain-Python oracle -----------------------------------------------------------
def _f32(v: float) -> float:
    return struct.unpack("f", struct.pack("f", v))[0]


def _f32_step(v: float, up: bool) -> float:
    """The float32 neighbour of float32 v towards +inf (up) or -inf."""
    bits = struct.unpack("I", struct.pack("f", v))[0]
    if v == 0:
        return struct.unpack("f", struct.pack("I", 1 if up else 0x80000001))[0]
    bits += 1 if (v > 0) == up else -1
    return struct.unpack("f", struct.pack("I", bits))[0]


def _sr(x: float, rng: random.Random) -> float:
    """Stochastic rounding of an exact float64 value x to float32, in plain Python."""
    y = _f32(x)
    if y == x:
        return y
    lo, hi = (y, _f32_step(y, True)) if y < x else (_f32_step(y, False), y)
    return hi if rng.random() < (x - lo) / (hi - lo) else lo


def _oracle_dot(a, b, rng: random.Random, lanes: int) -> float:
    """The lane-order per-instruction SR dot product (reductions module docstring), on Python floats. With
    operands in +-[0.5, 1) every product and every sum is exact in float64, so each rounding sees the exact
    value."""
    k = len(a)
    acc = [None] * lanes
    for i in range(k):
        p = _sr(a[i] * b[i], rng)
        j = i % lanes
        acc[j] = p if acc[j] is None else _sr(acc[j] + p, rng)
    acc = [0.0 if v is None else v for v in acc]
    while len(acc) > 1:
        half = len(acc) // 2
        acc = [_sr(acc[j] + acc[j + half], rng) for j in range(half)]
    return acc[0]


def test_instruction_mode_spread_matches_a_plain_python_oracle():
    """One output of a 3x3x3 convolution over 32 channels (864 multiplies and 863 additions) over 200 streams:
    its spread (standard deviation) is within 20 % of the plain-Python per-instruction oracle's, both centred on
    the exact value; op-level rounding of the same output is far narrower (one rounding)."""
    g = torch.Generator().manual_seed(7)
    sign = lambda shape: torch.randint(0, 2, shape, generator=g).float() * 2 - 1  # noqa: E731
    x = (torch.rand(1, 32, 3, 3, 3, generator=g) * 0.5 + 0.5) * sign((1, 32, 3, 3, 3))
    w = (torch.rand(1, 32, 3, 3, 3, generator=g) * 0.5 + 0.5) * sign((1, 32, 3, 3, 3))
    exact = float((x.double() * w.double()).sum())
    ours, ops = [], []
    for stream in range(200):
        with MonteCarloArithmetic(stream=stream, granularity="instruction"):
            ours.append(torch.nn.functional.conv3d(x, w).item())
        with MonteCarloArithmetic(stream=stream, granularity="op"):
            ops.append(torch.nn.functional.conv3d(x, w).item())
    a, b = [_f32(v) for v in w.flatten().tolist()], [_f32(v) for v in x.flatten().tolist()]
    assert lanes_for(864) == 8
    oracle = [_oracle_dot(a, b, random.Random(s), 8) for s in range(200)]
    ulp = math.ulp(_f32(exact)) * 2 ** 29  # float32 ulp of the result
    spread, want = np.std(ours) / ulp, np.std(oracle) / ulp
    assert abs(spread / want - 1) <= 0.20, (spread, want)
    assert abs(np.mean(ours) - exact) <= 4 * np.std(ours) / math.sqrt(200)
    assert np.std(ops) / ulp < 0.6 < spread  # one rounding: at most 1 ulp apart


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_convolution_and_gradients_match_float64(granularity):
    """A strided, padded 3-d convolution with bias, and its three gradients, stay within a few float32 ulps of
    the float64 computation in both modes (the special routes compute the same convolution)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 6, 5, generator=g, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, 3, generator=g, requires_grad=True)
    bias = torch.randn(4, generator=g, requires_grad=True)
    ref = torch.nn.functional.conv3d(x.double(), w.double(), bias.double(), stride=(2, 1, 2), padding=1)
    up = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    ref_grads = torch.autograd.grad((ref * up).sum(), (x, w, bias))
    with MonteCarloArithmetic(stream=0, granularity=granularity):
        out = torch.nn.functional.conv3d(x, w, bias, stride=(2, 1, 2), padding=1)
        grads = torch.autograd.grad((out * up.float()).sum(), (x, w, bias))
    tolerance = 1e-5 if granularity == "op" else 1e-4
    assert out.shape == ref.shape and (out.double() - ref).abs().max() <= tolerance * ref.abs().max()
    for got, want in zip(grads, ref_grads):
        assert got.shape == want.shape and (got.double() - want).abs().max() <= tolerance * want.abs().max()


def test_instruction_mode_matmul_and_sums():
    """mm, addmm, sum and mean under instruction mode stay close to float64 and vary between streams."""
    g = torch.Generator().manual_seed(1)
    a, b, c = torch.randn(5, 300, generator=g), torch.randn(300, 7, generator=g), torch.randn(5, 7, generator=g)
    big = torch.randn(3, 5000, generator=g)
    results = []
    for stream in (0, 1):
        with MonteCarloArithmetic(stream=stream, granularity="instruction"):
            results.append((a @ b, torch.addmm(c, a, b), big.sum(dim=1), big.mean(), big.sum()))
    refs = (a.double() @ b.double(), c.double() + a.double() @ b.double(), big.double().sum(1), big.double().mean(),
            big.double().sum())
    for got, ref in zip(results[0], refs):
        assert (got.double() - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())
    assert any(not torch.equal(u, v) for u, v in zip(*results))



def test_ops_without_rounding_are_not_perturbed():
    x = torch.randn(4, 6)
    idx = torch.tensor([2, 0])
    with MonteCarloArithmetic(4, stream=0):
        results = [x.clone(), x.t().contiguous(), x.view(-1), torch.cat([x, x]), x[idx], x[:, 1:3], torch.relu(x),
                   x.abs(), -x, x.clamp(-0.5, 0.5), torch.where(x > 0, x, torch.zeros_like(x)), x.max(dim=1).values,
                   torch.nn.functional.pad(x, (1, 1)), torch.empty(3).fill_(0.3), x.to(torch.float64),
                   torch.zeros(3).copy_(x[0, :3]), torch.zeros(5).index_put_((idx,), x[0, :2]),
                   torch.zeros(5).scatter_(0, idx, x[0, :2])]
        accumulated = torch.zeros(5).index_put_((idx,), x[0, :2], accumulate=True)
    expected = [x, x.t(), x.view(-1), torch.cat([x, x]), x[idx], x[:, 1:3], torch.relu(x), x.abs(), -x,
                x.clamp(-0.5, 0.5), torch.where(x > 0, x, torch.zeros_like(x)), x.max(dim=1).values,
                torch.nn.functional.pad(x, (1, 1)), torch.full((3,), 0.3), x.double(), x[0, :3],
                torch.zeros(5).index_put_((idx,), x[0, :2]), torch.zeros(5).scatter_(0, idx, x[0, :2])]
    for got, want in zip(results, expected):
        assert torch.equal(got, want)
    assert not torch.equal(accumulated, torch.zeros(5).index_put_((idx,), x[0, :2], accumulate=True))
    assert {"cat", "clone", "relu", "index", "fill", "_to_copy"} <= NO_ROUNDING
    assert not is_perturbed(aten.view.default) and not is_perturbed(aten.copy_.default)
    assert is_perturbed(aten.mul.Tensor) and is_perturbed(aten.add_.Tensor) and is_perturbed(aten.convolution.default)
    assert is_perturbed(aten.convolution_backward.default) and is_perturbed(aten._foreach_add_.List)


def test_in_place_and_out_variants_round_the_mutated_tensor():
    """mul_ and mul(out=) give the stochastically rounded float64 product, in the original tensor object."""
    a, b = _operands(10_000)
    inplace = a.clone()
    out = torch.empty_like(a)
    ident = id(inplace)
    with MonteCarloArithmetic(stream=0):
        returned = inplace.mul_(b)
        torch.mul(a, b, out=out)
    assert id(returned) == ident and inplace.dtype == torch.float32
    exact = a.double() * b.double()
    ulp = torch.from_numpy(np.spacing(np.abs(exact.float().numpy())).astype(np.float64))
    for got in (inplace, out):
        assert torch.all((got.double() - exact).abs() < ulp * 1.0000001)
        assert not torch.equal(got, a * b)


def test_float_scalars_are_rounded_to_float32_first():
    """x * 0.1 computes with float32(0.1), as PyTorch's float32 kernel does: exact x * fl32(0.1) is what is
    rounded (checked on x = 2^k, where that product is exact and must come back unchanged)."""
    x = torch.tensor([1.0, 2.0, 0.25, 1024.0])
    with MonteCarloArithmetic(stream=0):
        y = x * 0.1
    assert torch.equal(y, x * torch.tensor(0.1, dtype=torch.float32))


def test_global_rng_untouched():
    """Noise comes from the mode's own generators: the training RNG sequence is the same as without it."""
    torch.manual_seed(123)
    with MonteCarloArithmetic(stream=5):
        _ = torch.randn(100) * 2.0
        after = torch.rand(5)
    torch.manual_seed(123)
    _ = torch.randn(100) * 2.0
    assert torch.equal(after, torch.rand(5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes_round_their_float32_result(dtype):
    """float16/bfloat16: computed in float32, stochastically rounded to the dtype (1 + 1/4 ulp rounds up a
    quarter of the time); float64 work is the high precision and is left alone."""
    n = 20_000
    ulp = 2.0 ** (1 - PRECISION[dtype])
    a, b = torch.ones(n, dtype=dtype), torch.full((n,), ulp / 4, dtype=dtype)
    with MonteCarloArithmetic(stream=0):
        s = a + b
        d = torch.ones(5, dtype=torch.float64) / 3
        mixed = torch.ones(5) + torch.ones(5, dtype=torch.float64) / 3  # promotes to float64 work
    up = (s.double() == 1 + ulp)
    assert mixed.dtype == torch.float64 and torch.equal(mixed, 1 + torch.ones(5, dtype=torch.float64) / 3)
    assert torch.all(up | (s == 1)) and abs(up.double().mean().item() - 0.25) <= 3.29 * math.sqrt(0.1875 / n)
    assert torch.equal(d, torch.ones(5, dtype=torch.float64) / 3)


def test_precision_and_granularity_checks():
    assert check_virtual_bits(None, torch.float32) == 24 and check_virtual_bits(16, torch.float32) == 16
    with pytest.raises(PrecisionError, match="t=25 exceeds the 24 bits of float32"):
        check_virtual_bits(25, torch.float32)
    for bad in (0, 25):
        with pytest.raises(PrecisionError):
            MonteCarloArithmetic(bad)
    with pytest.raises(PrecisionError, match="float16"):
        with MonteCarloArithmetic(16):
            torch.ones(3, dtype=torch.float16) * 2.0
    with pytest.raises(ValueError, match="granularity must be one of"):
        MonteCarloArithmetic(granularity="instr")
