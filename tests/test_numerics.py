"""MCA random rounding (``nnunet_varaug.numerics``): its statistics, coverage of forward/backward/optimizer,
reproducibility and what it must leave alone."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nnunet_varaug.numerics import (NO_ROUNDING, PRECISION, MonteCarloArithmetic, PrecisionError,
                                    check_virtual_bits, is_perturbed)

aten = torch.ops.aten


def _operands(n: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = (torch.rand(n, generator=g, dtype=torch.float64) * 4 - 2).to(dtype)
    b = (torch.rand(n, generator=g, dtype=torch.float64) * 4 - 2).to(dtype)
    return a, b


@pytest.mark.parametrize("dtype,bits", [(torch.float32, None), (torch.float32, 20), (torch.float32, 12),
                                        (torch.float64, None), (torch.float64, 40)])
def test_relative_error_is_unbiased_and_bounded(dtype, bits):
    """Over 2^20 products: |relative error| <= 2^(1-t), mean ~ 0 (within 5 standard errors), and the
    rounding really happens (at t = p: one ulp up or down with probability 1/8 each)."""
    n = 1 << 20
    a, b = _operands(n, dtype)
    plain = a * b
    with MonteCarloArithmetic(bits, stream=1):
        noisy = a * b
    t = PRECISION[dtype] if bits is None else bits
    rel = ((noisy.double() - plain.double()) / plain.double()).numpy()
    assert np.abs(rel).max() <= 2.0 ** (1 - t)
    assert abs(rel.mean()) <= 5 * rel.std() / np.sqrt(n)
    if bits is None:  # SR of y + ulp*xi: +-1 ulp with probability 1/8 each, else y
        steps = (noisy.view(torch.int64 if dtype == torch.float64 else torch.int32)
                 - plain.view(torch.int64 if dtype == torch.float64 else torch.int32)).numpy()
        assert set(np.unique(steps)) <= {-1, 0, 1}
        for step in (-1, 1):
            assert abs(np.mean(steps == step) - 1 / 8) < 0.003
    else:  # in units of 2^(e_x - t), the noise is xi ~ U(-1/2, 1/2) (plus round-to-nearest's half ulp)
        _, e = torch.frexp(plain.double())
        xi = ((noisy.double() - plain.double()) / torch.ldexp(torch.ones_like(plain.double()), e - t)).numpy()
        assert np.abs(xi).max() <= 0.5 + 2.0 ** (t - PRECISION[dtype])
        assert abs(xi.var() * 12 - 1) < 0.05


def test_error_against_exact_result_stays_within_bound():
    """Against the exact (float64) product, float32 at t <= 22 stays within 2^(1-t) too (noise + rounding)."""
    a, b = _operands(1 << 18)
    exact = a.double() * b.double()
    for t in (22, 16, 8):
        with MonteCarloArithmetic(t, stream=t):
            noisy = a * b
        rel = ((noisy.double() - exact) / exact).abs().max().item()
        assert rel <= 2.0 ** (1 - t)
        assert rel > 2.0 ** (-1 - t)  # and the noise does reach its scale


def test_special_values_and_non_float_results_untouched():
    x = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, 3.0, -2.0])
    with MonteCarloArithmetic(8, stream=0):
        y = x * 1.0
        ints = torch.arange(10) * 3
        flags = x > 1
    assert torch.equal(y[:4], x[:4]) and torch.isnan(y[4]) and y[5] == x[5]  # zeros, infs, NaN, subnormal
    assert not torch.equal(y[6:], x[6:])
    assert torch.equal(ints, torch.arange(10) * 3) and ints.dtype == torch.int64 and flags.dtype == torch.bool


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


def test_in_place_and_out_variants_perturb_the_mutated_tensor():
    a, b = _operands(10_000)
    inplace = a.clone()
    out = torch.empty_like(a)
    with MonteCarloArithmetic(10, stream=0):
        inplace.mul_(b)
        torch.mul(a, b, out=out)
    for got in (inplace, out):
        rel = ((got - a * b) / (a * b)).abs()
        assert rel.max() <= 2.0 ** -9 and (rel > 0).float().mean() > 0.9


def _small_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.InstanceNorm3d(4, affine=True),
                               torch.nn.LeakyReLU(0.01), torch.nn.Conv3d(4, 4, 3, padding=1),
                               torch.nn.InstanceNorm3d(4, affine=True), torch.nn.LeakyReLU(0.01),
                               torch.nn.Conv3d(4, 2, 1), torch.nn.Softmax(dim=1))


def _train_step(stream, bits=None, backward_only=False):
    """One SGD step of the small network; returns (gradients, updated weights)."""
    net = _small_net()
    x = torch.randn(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    mca = MonteCarloArithmetic(bits, stream=stream)
    if backward_only:
        loss = net(x)[:, 0].square().mean()
        with mca:
            loss.backward()
        opt.step()
    else:
        with mca:
            loss = net(x)[:, 0].square().mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
            opt.step()
    grads = torch.cat([p.grad.flatten() for p in net.parameters()])
    weights = torch.cat([p.detach().flatten() for p in net.parameters()])
    return grads, weights


def test_same_stream_is_bitwise_reproducible_and_streams_differ():
    g0, w0 = _train_step(0)
    g0b, w0b = _train_step(0)
    g1, w1 = _train_step(1)
    assert torch.equal(g0, g0b) and torch.equal(w0, w0b)
    assert not torch.equal(g0, g1) and not torch.equal(w0, w1)
    rel = ((g0 - g1).abs() / g0.abs().clamp_min(1e-12)).median()
    assert 0 < rel < 1e-3  # rounding-sized differences, not a different computation


def test_backward_and_optimizer_are_perturbed():
    """Forward outside the mode: gradients still differ between streams, so backward ops are perturbed."""
    g0, _ = _train_step(0, backward_only=True)
    g1, _ = _train_step(1, backward_only=True)
    assert not torch.equal(g0, g1)
    # The optimizer alone: the same gradients, stepped under two streams, give different weights.
    params = [torch.nn.Parameter(torch.randn(1000, generator=torch.Generator().manual_seed(2))) for _ in range(3)]
    results = []
    for stream in (0, 1):
        ps = [torch.nn.Parameter(p.detach().clone()) for p in params]
        for p in ps:
            p.grad = torch.ones_like(p) * 0.37
        opt = torch.optim.SGD(ps, lr=0.01, momentum=0.99, nesterov=True, weight_decay=3e-5, foreach=True)
        with MonteCarloArithmetic(stream=stream):
            opt.step()
        results.append(torch.cat([p.detach() for p in ps]))
    assert not torch.equal(results[0], results[1])


def test_global_rng_untouched():
    """Noise comes from the mode's own generators: the training RNG sequence is the same as without it."""
    torch.manual_seed(123)
    with MonteCarloArithmetic(stream=5):
        _ = torch.randn(100) * 2.0
        after = torch.rand(5)
    torch.manual_seed(123)
    _ = torch.randn(100) * 2.0
    assert torch.equal(after, torch.rand(5))


def test_significant_digits_follow_virtual_precision():
    """Significant bits (significantdigits, general method: the largest k with |relative error| <= 2^-k for all
    30 samples) of a small fixed network's softmax output, per output, median over outputs.

    Expected about t - 1: the last op alone perturbs by up to 2^(1 - t), and 30 samples reach that tail. The
    tolerance [t - 3, t] allows up to 2 more bits lost to the upstream ops' accumulated errors (damped by
    normalisation and softmax) and, at t = 24, to float32's own rounding; measured: 22, 19, 15, 11, 7."""
    import significantdigits as sd

    net = _small_net()
    x = torch.randn(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = net.double()(x.double()).numpy()
        net.float()
        medians = []
        for t in (24, 20, 16, 12, 8):
            mca = MonteCarloArithmetic(t, stream=0)
            samples = []
            for k in range(30):
                mca.reseed(k)
                with mca:
                    samples.append(net(x).double().numpy())
            bits = sd.significant_digits(np.stack(samples), reference=reference, method=sd.Method.General, basis=2)
            medians.append(float(np.median(bits)))
            assert t - 3 <= medians[-1] <= t, (t, medians)
    assert all(a > b for a, b in zip(medians, medians[1:]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_default_precision_per_dtype(dtype):
    x = torch.full((20_000,), 3.0, dtype=dtype)
    with MonteCarloArithmetic(stream=0):
        y = x * 1.0
    steps = (y.double() - 3.0) / 2.0 ** (2 - PRECISION[dtype])  # in ulps of 3 (binade [2, 4): ulp 2^(2-p))
    assert set(torch.unique(steps).tolist()) == {-1.0, 0.0, 1.0}


def test_precision_checks():
    assert check_virtual_bits(None, torch.float32) == 24 and check_virtual_bits(None, torch.float64) == 53
    assert check_virtual_bits(16, torch.float32) == 16
    with pytest.raises(PrecisionError, match="t=25 exceeds the 24 bits of float32"):
        check_virtual_bits(25, torch.float32)
    with pytest.raises(PrecisionError):
        MonteCarloArithmetic(0)
    with pytest.raises(PrecisionError):
        MonteCarloArithmetic(54)
    with pytest.raises(PrecisionError, match="float32"):
        with MonteCarloArithmetic(30):
            torch.ones(3) * 2.0
    with MonteCarloArithmetic(30):  # float64 carries 30 bits
        torch.ones(3, dtype=torch.float64) * 2.0
