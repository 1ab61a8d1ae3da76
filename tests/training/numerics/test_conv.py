"""The float64 convolution routes of ``numerics.conv`` (op level), each against PyTorch's float64 convolution and
its autograd gradients: the shifted-GEMM route in one block and in many, im2col, and one GEMM per offset."""
from __future__ import annotations

import pytest
import torch

from nnunet_varaug.training.numerics import conv, flatconv

pytestmark = pytest.mark.unit


def _close(got, want):
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-12 * want.abs().max()


def _check_against_autograd(x, w, geo, fn, gen, **kwargs):
    """conv.forward_high / input_grad_high / weight_grad_high of (x, w, geo) against float64 ``fn`` and autograd,
    for a random float32 output gradient."""
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    out = fn(xd, wd, **kwargs)
    g = torch.randn(out.shape, generator=gen)
    gx, gw = torch.autograd.grad((out * g.double()).sum(), (xd, wd))
    _close(conv.forward_high(x, w, geo), out.detach())
    _close(conv.input_grad_high(g, w, geo), gx)
    _close(conv.weight_grad_high(g, x, w.shape, geo), gw)


@pytest.mark.parametrize("route, stride, padding, dilation, block", [
    ("flat", 1, 1, 1, 7),        # many blocks, the last one short
    ("flat", 1, 2, 2, 4096),     # dilated, one block
    ("flat", 2, 1, 1, 5),        # eight phases (odd sizes: the phase grids are padded), many blocks
    ("flat", (2, 1, 3), 1, (1, 2, 1), 4096),  # per-axis strides and dilations
    ("im2col", 2, 1, 1, 4096),
    ("offsets", 2, 1, 1, 4096),
    ("offsets", 1, 2, 2, 4096),
])
def test_route_equals_float64_convolution_and_its_gradients(monkeypatch, route, stride, padding, dilation, block):
    """Forward, input gradient and weight gradient of each route equal float64 autograd to 1e-12 relative (the
    routes sum exact float32 products in float64, in other orders than PyTorch)."""
    monkeypatch.setattr(flatconv, "FLAT_BLOCK", block)
    monkeypatch.setattr(conv, "choose_route", lambda *args: route)
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 3, 9, 8, 7, generator=gen), torch.randn(4, 3, 3, 3, 3, generator=gen)
    stride, dilation = (v if isinstance(v, tuple) else (v,) * 3 for v in (stride, dilation))
    geo = conv.Geometry(x.shape[2:], w.shape[2:], stride, [padding], dilation)
    _check_against_autograd(x, w, geo, torch.nn.functional.conv3d, gen, stride=stride, padding=padding,
                            dilation=dilation)


def test_flat_route_of_a_kernel_two_stride_two_convolution(monkeypatch):
    """nnU-Net's transposed convolutions are the gradients of kernel-2, stride-2 convolutions: every offset its
    own phase at shift 0, and the route taken for them."""
    gen = torch.Generator().manual_seed(2)
    x, w = torch.randn(2, 5, 8, 6, 4, generator=gen), torch.randn(3, 5, 2, 2, 2, generator=gen)
    geo = conv.Geometry(x.shape[2:], w.shape[2:], [2], [0], [1])
    assert conv.choose_route(geo, 2, 5) == "flat"
    _check_against_autograd(x, w, geo, torch.nn.functional.conv3d, gen, stride=2)


def test_blocks_cover_the_grid_once_and_a_gpu_takes_one_block(monkeypatch):
    """CPU blocks tile [0, length) without gap or overlap; on a GPU one block (no launches of tiny GEMMs)."""
    monkeypatch.setattr(flatconv, "FLAT_BLOCK", 100)
    f = flatconv.Flat(conv.Geometry([9, 8, 7], [3, 3, 3], [1], [1], [1]), 2)
    cpu = f.blocks(torch.device("cpu"))
    assert [a for a, _ in cpu[1:]] == [b for _, b in cpu[:-1]] and cpu[0][0] == 0 and cpu[-1][1] == f.length
    assert all(b - a <= 100 for a, b in cpu) and len(cpu) == -(-f.length // 100)
    assert f.blocks(torch.device("cuda")) == [(0, f.length)]


@pytest.mark.parametrize("dims", [1, 2])
def test_flat_route_in_one_and_two_dimensions(monkeypatch, dims):
    """The phase grids of 1-d and 2-d convolutions (strided, with many blocks) against float64 autograd."""
    monkeypatch.setattr(flatconv, "FLAT_BLOCK", 5)
    monkeypatch.setattr(conv, "choose_route", lambda *args: "flat")
    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(2, 3, *[11, 9][:dims], generator=gen), torch.randn(4, 3, *[3, 3][:dims], generator=gen)
    geo = conv.Geometry(x.shape[2:], w.shape[2:], [2], [1], [1])
    fn = torch.nn.functional.conv1d if dims == 1 else torch.nn.functional.conv2d
    _check_against_autograd(x, w, geo, fn, gen, stride=2, padding=1)
