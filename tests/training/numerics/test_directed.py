"""Directed-rounding tests: with the random words replaced by all ones ("up": away from zero) or zeros ("down":
towards zero), every kernel must equal a plain-Python oracle bit for bit, which pins down each kernel's arithmetic
and its order of instructions: op level (one rounding of the exact result) and instruction level (the lane order
of lanes.py and the sequences of reductions.py), forward and backward, compiled kernels and PyTorch reference.

Operands are multiples of 2^-12 below 1, so products (26 bits) are exact in float64 but not in float32, and
op-level float64 sums are exact: the oracle's exact integer sums are the right answer for op level."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

import numerics_oracle as oracle
from nnunet_varaug.training.numerics import MonteCarloArithmetic, kernels

pytestmark = pytest.mark.unit
aten = torch.ops.aten
SCALE = 2.0 ** -12


@pytest.fixture(params=["compiled", "reference"])
def path(request, monkeypatch):
    if request.param == "compiled" and kernels.library() is None:
        pytest.skip(kernels.status())
    if request.param == "reference":
        monkeypatch.setattr(kernels, "usable", lambda *tensors: False)
    return request.param


def _values(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-4095, 4096, shape, generator=g).float() * SCALE


def _run(direction, granularity, fn):
    with MonteCarloArithmetic(directed=direction, granularity=granularity):
        return fn()


def _rnd(direction):
    return lambda v: oracle.directed32(v, direction == "up")


# ---- convolution geometry in plain Python ----------------------------------------------------------------------
class Conv:
    """A convolution of Y (N, Ci, *S) with W (Co, Ci, *k): its terms in the documented order."""

    def __init__(self, y, w, stride, padding):
        self.y, self.w = y.tolist(), w.tolist()
        self.n, self.ci, self.size = y.shape[0], y.shape[1], list(y.shape[2:])
        self.co, self.kernel = w.shape[0], list(w.shape[2:])
        self.stride, self.padding = stride, padding
        self.out = [(s + 2 * padding - k) // stride + 1 for s, k in zip(self.size, self.kernel)]
        self.offsets = list(itertools.product(*(range(k) for k in self.kernel)))
        self.positions = [(n, o) for n in range(self.n) for o in itertools.product(*(range(v) for v in self.out))]

    def _get(self, t, index):
        for i in index:
            t = t[i]
        return t

    def input_at(self, n, c, o, off):
        pos = [oi * self.stride - self.padding + fi for oi, fi in zip(o, off)]
        if any(p < 0 or p >= s for p, s in zip(pos, self.size)):
            return 0.0
        return self._get(self.y[n][c], pos)

    def column(self, n, o):  # im2col row of output position (n, o): (channel, offsets)
        return [self.input_at(n, c, o, off) for c in range(self.ci) for off in self.offsets]

    def weight_row(self, co):
        return [self._get(self.w[co][c], off) for c in range(self.ci) for off in self.offsets]


def _conv_forward_oracle(conv, bias, rnd):
    out = {}
    for co in range(conv.co):
        for n, o in conv.positions:
            v = oracle.dot(conv.weight_row(co), conv.column(n, o), rnd)
            out[(n, co) + o] = rnd(v + bias[co]) if bias is not None else v
    return out


def _as_dict(t):
    return {idx: t[idx].item() for idx in itertools.product(*(range(s) for s in t.shape))}


def _conv_input_grad_oracle(conv, g, rnd):
    """Columns W^T g (dot over Co), added into the padded input offset by offset, each addition rounded."""
    g = g.tolist()
    padded = {}
    for j, off in enumerate(conv.offsets):
        for c in range(conv.ci):
            for n, o in conv.positions:
                a = [conv._get(conv.w[co][c], off) for co in range(conv.co)]
                b = [conv._get(g[n][co], o) for co in range(conv.co)]
                column = oracle.dot(a, b, rnd)
                pos = tuple(oi * conv.stride + fi for oi, fi in zip(o, off))
                padded[(n, c) + pos] = rnd(padded.get((n, c) + pos, 0.0) + column)
    out = {}
    for n in range(conv.n):
        for c in range(conv.ci):
            for s in itertools.product(*(range(v) for v in conv.size)):
                out[(n, c) + s] = padded.get((n, c) + tuple(v + conv.padding for v in s), 0.0)
    return out


def _conv_weight_grad_oracle(conv, g, rnd):
    g = g.tolist()
    out = {}
    for co in range(conv.co):
        a = [conv._get(g[n][co], o) for n, o in conv.positions]
        for kk, (c, off) in enumerate(itertools.product(range(conv.ci), conv.offsets)):
            b = [conv.input_at(n, c, o, off) for n, o in conv.positions]
            out[(co, c) + off] = oracle.dot(a, b, rnd)
    return out


def _bias_grad_oracle(g, rnd):
    return {(c,): oracle.total(g.transpose(0, 1).reshape(g.shape[1], -1)[c].tolist(), rnd) for c in range(g.shape[1])}


# ---- tests -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("direction", ["up", "down"])
def test_instruction_level_convolution_forward_and_backward(direction, path):
    """Strided, padded 3-d convolution with bias and its three gradients, per instruction, bit for bit."""
    x, w, bias = _values((2, 2, 5, 4, 4), 0), _values((3, 2, 3, 3, 3), 1), _values((3,), 2)
    conv = Conv(x, w, 2, 1)
    g = _values((2, 3, *conv.out), 3)
    rnd = _rnd(direction)
    out = _run(direction, "instruction", lambda: aten.convolution(x, w, bias, [2], [1], [1], False, [0], 1))
    gi, gw, gb = _run(direction, "instruction", lambda: aten.convolution_backward(
        g, x, w, [3], [2], [1], [1], False, [0], 1, [True, True, True]))
    assert _as_dict(out) == _conv_forward_oracle(conv, bias.tolist(), rnd)
    assert _as_dict(gi) == _conv_input_grad_oracle(conv, g, rnd)
    assert _as_dict(gw) == _conv_weight_grad_oracle(conv, g, rnd)
    assert _as_dict(gb) == _bias_grad_oracle(g, rnd)


@pytest.mark.parametrize("direction", ["up", "down"])
def test_instruction_level_transposed_convolution(direction, path):
    """A stride-2 transposed convolution (nnU-Net's upsampling) is the input gradient of a convolution of its
    output; its gradients are that convolution's forward pass and weight gradient, per instruction."""
    x, w = _values((1, 3, 2, 3, 2), 4), _values((3, 2, 2, 2, 2), 5)  # w: (C_in, C_out, k)
    rnd = _rnd(direction)
    out = _run(direction, "instruction", lambda: aten.convolution(x, w, None, [2], [0], [1], True, [0], 1))
    assert out.shape == (1, 2, 4, 6, 4)
    conv = Conv(torch.zeros(out.shape), w, 2, 0)  # the ordinary convolution: Y = out, output gradient = x
    assert _as_dict(out) == _conv_input_grad_oracle(conv, x, rnd)
    gy = _values(out.shape, 6)
    gx, gw, gb = _run(direction, "instruction", lambda: aten.convolution_backward(
        gy, x, w, [2], [2], [0], [1], True, [0], 1, [True, True, True]))
    conv_y = Conv(gy, w, 2, 0)
    assert _as_dict(gx) == _conv_forward_oracle(conv_y, None, rnd)
    assert _as_dict(gw) == _conv_weight_grad_oracle(conv_y, x, rnd)
    assert _as_dict(gb) == _bias_grad_oracle(gy, rnd)


@pytest.mark.parametrize("route", ["flat", "im2col", "offsets"])
@pytest.mark.parametrize("direction", ["up", "down"])
def test_op_level_convolution_rounds_the_exact_result_once(direction, route, path, monkeypatch):
    """At op level a convolution (and each gradient, and a transposed one) is its exact value rounded once, by each
    of the three float64 routes (shifted GEMMs on the padded grid, one im2col GEMM, one GEMM per offset)."""
    from nnunet_varaug.training.numerics import conv as conv_routes

    monkeypatch.setattr(conv_routes, "choose_route", lambda geo, n, ci: route if route != "flat" or all(
        s == 1 for s in geo.stride) else "offsets")
    x, w, bias = _values((2, 2, 4, 4, 3), 7), _values((3, 2, 3, 3, 3), 8), _values((3,), 9)
    rnd = _rnd(direction)
    exact = torch.nn.functional.conv3d(x.double(), w.double(), bias.double(), padding=1)  # exact: 2^-24 grid
    out = _run(direction, "op", lambda: aten.convolution(x, w, bias, [1], [1], [1], False, [0], 1))
    assert out.tolist() == [[[[[rnd(v) for v in r] for r in p] for p in c] for c in n] for n in exact.tolist()]
    g = _values(out.shape, 10)
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    gx, gw = torch.autograd.grad(torch.nn.functional.conv3d(xd, wd, padding=1), (xd, wd), g.double())
    gi, gwt, gb = _run(direction, "op", lambda: aten.convolution_backward(
        g, x, w, [3], [1], [1], [1], False, [0], 1, [True, True, True]))
    for got, want in ((gi, gx), (gwt, gw), (gb, g.double().sum((0, 2, 3, 4)))):
        assert got.flatten().tolist() == [rnd(v) for v in want.flatten().tolist()]
    xt, wt = _values((1, 3, 2, 2, 2), 11), _values((3, 2, 2, 2, 2), 12)
    up = _run(direction, "op", lambda: aten.convolution(xt, wt, None, [2], [0], [1], True, [0], 1))
    want = torch.nn.functional.conv_transpose3d(xt.double(), wt.double(), stride=2)
    assert up.flatten().tolist() == [rnd(v) for v in want.flatten().tolist()]


@pytest.mark.parametrize("direction", ["up", "down"])
def test_instruction_level_matrix_products_and_sums(direction, path):
    a, b, c = _values((3, 40), 13), _values((40, 5), 14), _values((3, 5), 15)
    big = _values((2, 3000), 16)  # 3000 terms: 16 lanes
    rnd = _rnd(direction)
    mm, addmm, rows, mean = _run(direction, "instruction", lambda: (a @ b, torch.addmm(c, a, b), big.sum(1),
                                                                    big.mean()))
    al, bl, cl = a.tolist(), b.t().tolist(), c.tolist()
    assert mm.tolist() == [[oracle.dot(al[i], bl[j], rnd) for j in range(5)] for i in range(3)]
    assert addmm.tolist() == [[rnd(oracle.dot(al[i], bl[j], rnd) + cl[i][j]) for j in range(5)] for i in range(3)]
    assert rows.tolist() == [oracle.total(r, rnd) for r in big.tolist()]
    assert mean.item() == rnd(oracle.total(big.flatten().tolist(), rnd) / 6000)


@pytest.mark.parametrize("direction", ["up", "down"])
def test_instruction_level_normalisation(direction, path):
    """Instance norm (batch norm in training without running statistics) and its backward pass, per instruction."""
    x, w, b, dy = _values((2, 3, 4, 3), 17), _values((3,), 18), _values((3,), 19), _values((2, 3, 4, 3), 20)
    eps = 1e-5
    rnd = _rnd(direction)
    y, mean, invstd = _run(direction, "instruction", lambda: aten.native_batch_norm(x, w, b, None, None, True,
                                                                                    0.1, eps))
    dx, dw, db = _run(direction, "instruction", lambda: aten.native_batch_norm_backward(
        dy, x, w, None, None, mean, invstd, True, eps, [True, True, True]))
    rows, grows = x.transpose(0, 1).reshape(3, -1).tolist(), dy.transpose(0, 1).reshape(3, -1).tolist()
    m = len(rows[0])
    for c in range(3):
        mu = rnd(oracle.total(rows[c], rnd) / m)
        d = [rnd(v - mu) for v in rows[c]]
        var = rnd(oracle.total([rnd(v * v) for v in d], rnd) / m)
        inv = rnd(1.0 / rnd(math.sqrt(rnd(var + eps))))
        want = [rnd(rnd(rnd(v * inv) * w[c].item()) + b[c].item()) for v in d]
        assert (mean[c].item(), invstd[c].item()) == (mu, inv)
        assert y.transpose(0, 1).reshape(3, -1)[c].tolist() == want
        xhat = [rnd(rnd(v - mu) * inv) for v in rows[c]]
        gb, gw = oracle.total(grows[c], rnd), oracle.dot(grows[c], xhat, rnd)
        scale = rnd(inv * w[c].item())
        want_dx = [rnd(rnd(rnd(g - rnd(gb / m)) - rnd(h * rnd(gw / m))) * scale) for g, h in zip(grows[c], xhat)]
        assert (db[c].item(), dw[c].item()) == (gb, gw)
        assert dx.transpose(0, 1).reshape(3, -1)[c].tolist() == want_dx


@pytest.mark.parametrize("direction", ["up", "down"])
def test_instruction_level_softmax_loss_and_norms(direction, path):
    """Softmax and log-softmax over the channels with their backward passes, the NLL loss (mean) and its
    gradient, and 2-norms, per instruction."""
    x, g = _values((2, 3, 4, 5), 21), _values((2, 3, 4, 5), 22)
    target = torch.randint(0, 3, (2, 4, 5), generator=torch.Generator().manual_seed(23))
    rnd = _rnd(direction)

    def step():
        s = aten._softmax(x, 1, False)
        ls = aten._log_softmax(x, 1, False)
        return (s, ls, aten._softmax_backward_data(g, s, 1, torch.float32),
                aten._log_softmax_backward_data(g, ls, 1, torch.float32), aten.nll_loss2d_forward(ls, target, None, 1,
                                                                                                  -100),
                aten._foreach_norm([x, g], 2), aten.linalg_vector_norm(x, 2))

    s, ls, ds, dls, (loss, count), norms, norm = _run(direction, "instruction", step)
    rows = lambda t: t.movedim(1, -1).reshape(-1, 3).tolist()  # noqa: E731
    for xr, sr, lsr, gr, dsr, dlsr in zip(rows(x), rows(s), rows(ls), rows(g), rows(ds), rows(dls)):
        m = max(xr)
        e = [rnd(math.exp(rnd(v - m))) for v in xr]
        assert sr == [rnd(v / oracle.total(e, rnd)) for v in e]
        d = [rnd(v - m) for v in xr]
        log_sum = rnd(math.log(oracle.total([rnd(math.exp(v)) for v in d], rnd)))
        assert lsr == [rnd(v - log_sum) for v in d]
        dot = oracle.dot(gr, sr, rnd)
        assert dsr == [rnd(y * rnd(gv - dot)) for gv, y in zip(gr, sr)]
        total = oracle.total(gr, rnd)
        assert dlsr == [rnd(gv - rnd(rnd(math.exp(y)) * total)) for gv, y in zip(gr, lsr)]
    picked = [-ls[n, t, i, j].item() for n in range(2) for i in range(4) for j in range(5)
              for t in [target[n, i, j].item()]]
    assert count.item() == 40 and loss.item() == rnd(oracle.total(picked, rnd) / 40)
    for t, got in zip((x, g), norms):
        flat = t.flatten().tolist()
        assert got.item() == rnd(math.sqrt(oracle.dot(flat, flat, rnd)))
    assert norm.item() == norms[0].item()
