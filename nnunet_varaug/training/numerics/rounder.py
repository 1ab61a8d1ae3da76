"""Rounding of the current op's results with the noise at their addresses (the one job of this module).

Each rounded aten op gets the next op index of the iteration (:class:`.noise.CounterNoise`); its roundings are
numbered from 0 in the order the op's route reserves them (:meth:`Rounder.reserve`), each output or instruction
sequence taking a contiguous section. A value's random word(s) depend on (key, iteration, op, address) alone, so
the compiled kernels and the PyTorch reference give the same bits whatever the chunking or thread count.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from nnunet_varaug.training.numerics import kernels
from nnunet_varaug.training.numerics.noise import MASK32, CounterNoise, DirectedNoise, philox4x32
from nnunet_varaug.training.numerics.rounding import (check_virtual_bits, random_round, stochastic_round,
                                                      words_per_rounding)


class Rounder:
    """Stochastic (or Verificarlo random) rounding of the current op's high-precision results."""

    def __init__(self, noise: CounterNoise, virtual_bits: Optional[int]):
        self.noise = noise
        self.virtual_bits = virtual_bits
        self.op = -1
        self.cursor = 0
        self.elements = 0

    # ---- addressing ------------------------------------------------------------------------------------------
    def begin_op(self) -> None:
        self.op = self.noise.next_op()
        self.cursor = 0

    def reserve(self, n: int) -> int:
        """The first address of ``n`` new roundings of the current op (sections start at multiples of 4)."""
        base = (self.cursor + 3) & ~3
        self.cursor = base + int(n)
        return base

    @property
    def directed(self) -> int:
        """0: Philox words; 1: all ones (always up); 2: zeros (always down)."""
        if isinstance(self.noise, DirectedNoise):
            return 1 if self.noise.up else 2
        return 0

    def t(self, dtype: torch.dtype) -> int:
        return check_virtual_bits(self.virtual_bits, dtype)

    def kernel_noise(self) -> Tuple[Tuple[int, int], int, int, int]:
        """(key, op, iteration, directed) for the compiled kernels."""
        return self.noise.key, self.op, max(self.noise.iteration, 0), self.directed

    # ---- rounding --------------------------------------------------------------------------------------------
    def round(self, high: torch.Tensor, dtype: torch.dtype, base: Optional[int] = None) -> torch.Tensor:
        """Round ``high`` (dtype ``HIGH[dtype]``) to ``dtype``; element i (row-major) takes address base + i."""
        if base is None:
            base = self.reserve(high.numel())
        self.elements += high.numel()
        t = self.t(dtype)
        if dtype == torch.float32 and high.dtype == torch.float64 and kernels.usable(high):
            key, op, iteration, directed = self.kernel_noise()
            return kernels.round_f32(high, t, key, op, iteration, directed, base)
        per = words_per_rounding(dtype, self.virtual_bits)
        words = self.noise.words(self.op, base, high.numel(), per, high.device)
        if per == 1:
            return stochastic_round(high, dtype, words[:, 0])
        return random_round(high, dtype, t, words)

    def round_at(self, high: torch.Tensor, dtype: torch.dtype, addresses: torch.Tensor) -> torch.Tensor:
        """Round ``high`` with the noise of explicit ``addresses`` (int64, broadcastable to ``high``); the caller
        counts the roundings in :attr:`elements` (padding instructions are not counted)."""
        addresses = addresses.expand(high.shape).reshape(-1)
        per = words_per_rounding(dtype, self.virtual_bits)
        words = self.words_at(addresses, per)
        if per == 1:
            return stochastic_round(high, dtype, words[:, 0])
        return random_round(high, dtype, self.t(dtype), words)

    def words_at(self, addresses: torch.Tensor, per: int) -> torch.Tensor:
        """The random words of explicit addresses: int64 (n, per)."""
        n = addresses.numel()
        if isinstance(self.noise, DirectedNoise):
            return self.noise.words(self.op, 0, n, per, addresses.device)
        per_block = 4 // per
        block = addresses // per_block
        words = torch.stack(philox4x32(block & MASK32, block >> 32, self.op, max(self.noise.iteration, 0),
                                       *self.noise.key), dim=1)  # (n, 4)
        first = (addresses % per_block) * per
        picked = [words.gather(1, (first + j).unsqueeze(1)) for j in range(per)]
        return torch.cat(picked, dim=1)

