"""The dispatch mode over whole training steps (``MonteCarloArithmetic``): reproducible streams, perturbed backward
and optimizer ops, thread-count independence, compiled kernels equal to the PyTorch reference, and a count of the
reductions instruction level leaves at one rounding."""
from __future__ import annotations

import math

import pytest
import torch

from nnunet_varaug.training.numerics import MonteCarloArithmetic

pytestmark = pytest.mark.unit
GRANULARITIES = ("op", "instruction")


def _small_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.InstanceNorm3d(4, affine=True),
                               torch.nn.LeakyReLU(0.01), torch.nn.Conv3d(4, 4, 3, padding=1),
                               torch.nn.InstanceNorm3d(4, affine=True), torch.nn.LeakyReLU(0.01),
                               torch.nn.Conv3d(4, 2, 1), torch.nn.Softmax(dim=1))


def _train_step(stream, granularity="op", backward_only=False):
    """One SGD step of the small network; returns (gradients, updated weights)."""
    net = _small_net()
    x = torch.randn(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    mca = MonteCarloArithmetic(stream=stream, granularity=granularity)
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


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_same_stream_is_bitwise_reproducible_and_streams_differ(granularity):
    g0, w0 = _train_step(0, granularity)
    g0b, w0b = _train_step(0, granularity)
    g1, w1 = _train_step(1, granularity)
    assert torch.equal(g0, g0b) and torch.equal(w0, w0b)
    assert not torch.equal(g0, g1) and not torch.equal(w0, w1)
    rel = ((g0 - g1).abs() / g0.abs().clamp_min(1e-12)).median()
    assert 0 < rel < 1e-3  # rounding-sized differences, not a different computation


def test_backward_and_optimizer_are_perturbed():
    """Forward outside the mode: gradients still differ between streams, so backward ops are perturbed."""
    g0, _ = _train_step(0, backward_only=True)
    g1, _ = _train_step(1, backward_only=True)
    assert not torch.equal(g0, g1)
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



@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_same_weights_with_one_and_two_threads(granularity):
    """The noise depends on addresses only and float64 reductions run in one order: a training step gives
    bitwise-equal gradients and weights on 1 and 2 threads."""
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(_train_step(3, granularity))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_compiled_kernels_and_reference_give_the_same_bits(granularity, monkeypatch):
    """With Philox noise (every rounding's address matters), a training step through the compiled kernels equals
    the PyTorch reference bit for bit."""
    from nnunet_varaug.training.numerics import kernels

    if kernels.library() is None:
        pytest.skip(kernels.status())
    compiled = _train_step(6, granularity)
    monkeypatch.setattr(kernels, "usable", lambda *tensors: False)
    reference = _train_step(6, granularity)
    assert torch.equal(compiled[0], reference[0]) and torch.equal(compiled[1], reference[1])


@pytest.mark.parametrize("numerator", [3, 13])
def test_instruction_level_addition_rounds_up_with_the_distance(numerator):
    """At instruction level, the one addition of a row [1, f ulp] rounds up with probability f = numerator/16
    (binomial 99.9 % bound over 20 000 rows)."""
    n, f = 20_000, numerator / 16
    rows = torch.stack([torch.ones(n), torch.full((n,), f * 2.0 ** -23)], dim=1)
    with MonteCarloArithmetic(stream=numerator, granularity="instruction"):
        s = rows.sum(1)
    up = s == 1 + 2.0 ** -23
    assert torch.all(up | (s == 1.0))
    assert abs(up.double().mean().item() - f) <= 3.29 * math.sqrt(f * (1 - f) / n)


def test_in_place_foreach_ops_are_rounded():
    """_foreach_mul_ and _foreach_add_ return nothing and write their first list: the written values are rounded
    (directed up: the inexact 1 + 2^-25 becomes the float32 above 1), as clip_grad_norm_ and foreach SGD use them."""
    xs = [torch.full((100,), 3.0), torch.full((7,), 3.0)]
    ys = [torch.ones(100), torch.ones(7)]
    with MonteCarloArithmetic(directed="up"):
        torch._foreach_mul_(xs, torch.tensor(1 / 3))  # 3 * float32(1/3) = 1 + 2^-25 + ...: inexact
        torch._foreach_add_(ys, [torch.full((100,), 2.0 ** -25), torch.full((7,), 2.0 ** -25)], alpha=1.0)
    assert all(torch.all(t == 1 + 2.0 ** -23) for t in xs + ys)


def test_instruction_level_leaves_no_reduction_at_one_rounding():
    """Counted with the mode's profile over a step like nnU-Net's (strided and transposed convolutions, instance
    norm, leaky ReLU, softmax cross-entropy and a Dice-like sum loss, gradient clipping, SGD): at instruction level
    every op that reduces takes a per-instruction route; only element-wise ops are rounded once per value."""
    from nnunet_varaug.training.numerics.profile import elementwise, summary

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.InstanceNorm3d(4, affine=True),
                              torch.nn.LeakyReLU(0.01), torch.nn.Conv3d(4, 4, 3, stride=2, padding=1),
                              torch.nn.ConvTranspose3d(4, 3, 2, stride=2))
    x = torch.randn(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    target = torch.randint(0, 3, (2, 8, 8, 8), generator=torch.Generator().manual_seed(2))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    mca = MonteCarloArithmetic(stream=1, granularity="instruction")
    mca.profile = {}
    with mca:
        logits = net(x)
        probs = torch.softmax(logits, 1)
        loss = torch.nn.functional.cross_entropy(logits, target) - (probs[:, 1] * (target == 1)).sum() / 100
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
        opt.step()
    generic = {name for name, e in mca.profile.items() if "generic" in e["routes"]}
    reducing = {name for name in generic if not elementwise(eval(f"torch.ops.{name}"))}
    assert not reducing and summary(mca.profile)["once"] == 0
    assert {"aten.convolution.default", "aten.native_batch_norm.default", "aten._softmax.default",
            "aten.nll_loss2d_forward.default", "aten._foreach_norm.Scalar"} <= set(mca.profile)


def test_fused_element_wise_ops_equal_the_generic_route(monkeypatch):
    """add/sub with alpha, mul, div, in place and out of place, tensor, Python and 0-dim float64 operands: the
    fused compiled kernels give the generic route's bits (Philox noise, so every address matters)."""
    from nnunet_varaug.training.numerics import kernels

    if kernels.library() is None:
        pytest.skip(kernels.status())
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(10_001, generator=g), torch.randn(10_001, generator=g)

    def ops():
        with MonteCarloArithmetic(stream=7) as mode:
            c = a.clone()
            c.add_(b, alpha=0.3)
            c.mul_(torch.tensor(0.7, dtype=torch.float64))
            out = [a + b, a - 2.5 * b, torch.sub(a, b, alpha=0.1), a * b, a * 0.1, a / b, a / 3, c, c.div_(b)]
        return out, mode.route

    fused, route = ops()
    assert route == "fused"
    monkeypatch.setattr(kernels, "usable", lambda *tensors: False)
    generic, _ = ops()
    assert all(torch.equal(x, y) for x, y in zip(fused, generic))


@pytest.mark.parametrize("k", [3, 77, 3000, 9000])
def test_compiled_lane_kernels_equal_the_reference(k, monkeypatch):
    """Per-instruction dot products, row dot products and sums of K terms (8, 16 and 32 lanes, partial last
    steps) through the compiled kernels equal the PyTorch reference with Philox noise."""
    from nnunet_varaug.training.numerics import kernels
    from nnunet_varaug.training.numerics.lanes import sr_dot, sr_dot_rows, sr_sum_rows
    from nnunet_varaug.training.numerics.noise import CounterNoise
    from nnunet_varaug.training.numerics.rounder import Rounder

    if kernels.library() is None:
        pytest.skip(kernels.status())
    g = torch.Generator().manual_seed(k)
    a, b = torch.randn(3, k, generator=g), torch.randn(5, k, generator=g)

    def run():
        rounder = Rounder(CounterNoise(11), None)
        rounder.noise.begin_iteration()
        rounder.begin_op()
        return sr_dot(a, b, rounder), sr_dot_rows(a, b[:3], rounder), sr_sum_rows(b, rounder)

    compiled = run()
    monkeypatch.setattr(kernels, "usable", lambda *tensors: False)
    assert all(torch.equal(x, y) for x, y in zip(compiled, run()))
