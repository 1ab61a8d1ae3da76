"""Plain-Python oracles for the numerics tests (no torch): float32 rounding to nearest, directed rounding away
from zero ("up") and towards zero ("down") as stochastic rounding does with all-ones or all-zero random words,
and per-instruction dot products and sums in the documented lane order."""
from __future__ import annotations

import math
import struct
from typing import Callable, List, Sequence

FLT_MAX = struct.unpack("f", struct.pack("I", 0x7F7FFFFF))[0]


def f32(v: float) -> float:
    """Round to nearest float32 (struct packs with a C (float) cast); +-inf beyond the float32 range."""
    if math.isnan(v) or math.isinf(v):
        return v
    try:
        return struct.unpack("f", struct.pack("f", v))[0]
    except OverflowError:
        return math.copysign(math.inf, v)


def step32(v: float, away: bool) -> float:
    """The float32 neighbour of the float32 ``v`` away from zero (``away``) or towards zero."""
    bits = struct.unpack("I", struct.pack("f", v))[0]
    if v == 0:
        return struct.unpack("f", struct.pack("I", (bits & 0x80000000) | 1))[0] if away else v
    return struct.unpack("f", struct.pack("I", bits + (1 if away else -1)))[0]


def directed32(x: float, up: bool) -> float:
    """Stochastic rounding of the float64 x to float32 with all-ones words (``up``: away from zero when inexact)
    or zero words (towards zero); beyond FLT_MAX the neighbour above is infinity (the documented overflow rule).
    Exact for doubles whose distance to the float32 grid is a multiple of 2^-29 of its spacing (all normal
    float32-range doubles; subnormal results need it by construction of the test values)."""
    if math.isnan(x) or math.isinf(x) or x == 0:
        return x
    if abs(x) > FLT_MAX:
        return math.copysign(math.inf, x) if up else math.copysign(FLT_MAX, x)
    y = f32(x)
    if y == x:
        return y
    if math.isinf(y):  # x rounds to inf under RN but lies below 2^128
        y = math.copysign(FLT_MAX, x)
    magnitude_up = abs(y) > abs(x)
    lo, hi = (step32(y, False), y) if magnitude_up else (y, step32(y, True))
    return hi if up else lo


def lanes_for(k: int) -> int:
    if k <= 2048:
        return 8
    lanes = 8
    while -(-k // lanes) > 256:
        lanes *= 2
    return lanes


def dot(a: Sequence[float], b: Sequence[float], rnd: Callable[[float], float]) -> float:
    """Per-instruction dot product in the lane order of lanes.py; ``rnd`` rounds one exact double."""
    k = len(a)
    lanes = lanes_for(k)
    acc: List = [None] * lanes
    for i in range(k):
        p = rnd(a[i] * b[i])
        j = i % lanes
        acc[j] = p if acc[j] is None else rnd(acc[j] + p)
    return tree([0.0 if v is None else v for v in acc], rnd)


def total(x: Sequence[float], rnd: Callable[[float], float]) -> float:
    """Per-instruction sum in the lane order of lanes.py."""
    lanes = lanes_for(len(x))
    acc: List = [None] * lanes
    for i, v in enumerate(x):
        j = i % lanes
        acc[j] = v if acc[j] is None else rnd(acc[j] + v)
    return tree([0.0 if v is None else v for v in acc], rnd)


def tree(acc: List[float], rnd: Callable[[float], float]) -> float:
    while len(acc) > 1:
        half = len(acc) // 2
        acc = [rnd(acc[j] + acc[j + half]) for j in range(half)]
    return acc[0]
