"""Counter-based noise for stochastic rounding (the one job of this module): Philox4x32-10, its key and counter.

Every random word the rounding uses is a pure function of where it is used, so a replica's noise does not depend
on thread count, kernel, tensor sizes elsewhere or device:

* **generator**: Philox4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC'11),
  written here with torch integer ops (any device) and, for speed, in the compiled kernels of :mod:`.kernels`;
  both are checked against Random123's known-answer vectors and against each other, bit for bit.
* **key** (64 bits): SplitMix64's ``next_seed`` (a bijection of 64-bit words; constants as in Verificarlo's
  ``src/common/rng/splitmix64.c``) of ``identity * 2^32 + epoch``, where ``identity`` is the noise stream
  (0 <= stream < 2^31) or, when the user gives ``seed=``, ``2^31 + seed`` (0 <= seed < 2^31). Distinct
  (stream or seed, epoch) pairs therefore have distinct keys: no two replicas or epochs can share noise.
* **counter** (128 bits): ``(block mod 2^32, block div 2^32, op, iteration)``. ``iteration`` counts the entries
  into the dispatch mode since the last ``reseed`` (one per training step), ``op`` the rounded aten ops within the
  iteration, and ``block`` the 4-word Philox output holding the rounding's random word(s): a rounding with
  address ``a`` (its place among the op's roundings) takes word ``a mod 4`` of block ``a div 4`` when it needs
  one word (stochastic rounding: its low ``q`` bits), words ``2 (a mod 2)`` and ``2 (a mod 2) + 1`` of block
  ``a div 2`` when it needs two (Verificarlo's random rounding: 51 bits).

Distinct (stream, epoch, iteration, op, address) thus never share a Philox input. :data:`GENERATOR` is recorded
with each replica; :func:`generator_warning` compares the records of replicas that are analysed together.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import numpy as np
import torch

#: Philox4x32 round multipliers and Weyl key increments (Random123's ``philox.h``; the tests check them through
#: Random123's known-answer vectors).
PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)
PHILOX_ROUNDS = 10
MASK32 = 0xFFFFFFFF
MASK64 = (1 << 64) - 1

#: What each replica records about its noise (debug.json and checkpoints, ``numerics.generator``).
GENERATOR: Dict[str, object] = {
    "name": "philox4x32-10",
    "version": 1,
    "key": "splitmix64(identity * 2^32 + epoch); identity = stream, or 2^31 + seed",
    "counter": "(block lo, block hi, op, iteration); 1 word per SR rounding, 2 per random rounding",
}

STREAM_LIMIT = 1 << 31
EPOCH_LIMIT = 1 << 32


def splitmix64(x: int) -> int:
    """SplitMix64's ``next_seed(x)``: a bijection of 64-bit words (so distinct inputs give distinct keys)."""
    z = (x + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def splitmix64_array(x: np.ndarray) -> np.ndarray:
    """:func:`splitmix64` of every element of a uint64 array (numpy wraps uint64 arithmetic modulo 2^64)."""
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def noise_identity(stream: int, seed: Optional[int] = None) -> int:
    """The 32-bit identity of a noise stream: ``stream``, or ``2^31 + seed`` when a seed is given.

    Raises:
        ValueError: stream or seed outside ``0 .. 2^31 - 1``.
    """
    if seed is not None:
        if not 0 <= int(seed) < STREAM_LIMIT:
            raise ValueError(f"seed={seed} must be in 0..{STREAM_LIMIT - 1} (it keys the Philox noise with the epoch)")
        return STREAM_LIMIT + int(seed)
    if not 0 <= int(stream) < STREAM_LIMIT:
        raise ValueError(f"stream={stream} must be in 0..{STREAM_LIMIT - 1}")
    return int(stream)


def noise_key(identity: int, epoch: int) -> Tuple[int, int]:
    """The Philox key (k0, k1) of a noise identity and epoch (module docstring)."""
    if not 0 <= int(epoch) < EPOCH_LIMIT:
        raise ValueError(f"epoch={epoch} must be in 0..{EPOCH_LIMIT - 1}")
    key = splitmix64((int(identity) << 32) | int(epoch))
    return key & MASK32, key >> 32


def _mulhilo(a: torch.Tensor, m: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of ``a * m`` for ``a`` in [0, 2^32) held in int64, without int64 overflow."""
    a_lo = a & 0xFFFF
    lo_part = a_lo * m
    t = (a >> 16) * m + (lo_part >> 16)
    return t >> 16, ((t & 0xFFFF) << 16) | (lo_part & 0xFFFF)


def philox4x32(c0: torch.Tensor, c1, c2, c3, k0: int, k1: int, rounds: int = PHILOX_ROUNDS):
    """Philox4x32-R of counters (c0, c1, c2, c3) and key (k0, k1): four int64 tensors of 32-bit words.

    The counters are int64 tensors (or ints) with values in [0, 2^32); they broadcast together.
    """
    device = c0.device
    c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64, device=device) for c in (c1, c2, c3))
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    for r in range(rounds):
        hi0, lo0 = _mulhilo(c0, PHILOX_M[0])
        hi1, lo1 = _mulhilo(c2, PHILOX_M[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        if r + 1 < rounds:
            k0, k1 = (k0 + PHILOX_W[0]) & MASK32, (k1 + PHILOX_W[1]) & MASK32
    return c0, c1, c2, c3


def philox_words(key: Tuple[int, int], op: int, iteration: int, base: int, n: int, per: int,
                 device: torch.device) -> torch.Tensor:
    """The random words of roundings ``base .. base + n - 1`` of an op: int64 (n, per), values in [0, 2^32)."""
    if per not in (1, 2):
        raise ValueError("a rounding takes 1 or 2 random words")
    per_block = 4 // per
    first, last = base // per_block, (base + n - 1) // per_block
    block = torch.arange(first, last + 1, dtype=torch.int64, device=device)
    words = torch.stack(philox4x32(block & MASK32, block >> 32, op, iteration, *key), dim=1)  # (blocks, 4)
    start = base - first * per_block
    return words.reshape(-1, per)[start:start + n]


class CounterNoise:
    """The noise of one stream: its key (identity, epoch) and the (iteration, op) counters of the dispatch mode."""

    def __init__(self, identity: int, epoch: int = 0):
        self.identity = int(identity)
        self.reseed(epoch)

    def reseed(self, epoch: int) -> None:
        """Key the noise with ``epoch`` and restart the counters (the next iteration is 0)."""
        self.epoch = int(epoch)
        self.key = noise_key(self.identity, self.epoch)
        self.iteration = -1
        self.op = -1

    def begin_iteration(self) -> None:
        self.iteration += 1
        self.op = -1
        if self.iteration >= EPOCH_LIMIT:
            raise OverflowError("more than 2^32 iterations in one epoch: reseed() with the next epoch")

    def next_op(self) -> int:
        self.op += 1
        if self.op >= EPOCH_LIMIT:
            raise OverflowError("more than 2^32 rounded ops in one iteration")
        return self.op

    def words(self, op: int, base: int, n: int, per: int, device: torch.device) -> torch.Tensor:
        return philox_words(self.key, op, max(self.iteration, 0), base, n, per, device)


class DirectedNoise(CounterNoise):
    """A random source that always rounds up (all words 2^32 - 1) or always down (all words 0), for testing
    every kernel's arithmetic and order against a directed-rounding oracle."""

    def __init__(self, up: bool):
        super().__init__(0)
        self.up = bool(up)

    def words(self, op: int, base: int, n: int, per: int, device: torch.device) -> torch.Tensor:
        return torch.full((n, per), MASK32 if self.up else 0, dtype=torch.int64, device=device)


def generator_warning(records: Mapping[str, Optional[Mapping]]) -> Optional[str]:
    """A warning when numerical replicas compared together drew their noise from different generators.

    Args:
        records: replica name -> its ``numerics.generator`` record (None for a numerical replica trained before
            the record existed).
    Returns:
        None when all records name the same generator and version (or there are fewer than two replicas).
    """
    groups: Dict[Tuple[object, object], list] = {}
    for name, record in records.items():
        key = (record.get("name"), record.get("version")) if record else ("no generator recorded", None)
        groups.setdefault(key, []).append(name)
    if len(groups) < 2:
        return None
    parts = "; ".join(f"{', '.join(names)}: {k[0]}" + (f" version {k[1]}" if k[1] is not None else "")
                      for k, names in groups.items())
    return (f"the numerical replicas drew their rounding noise from different generators ({parts}), so their "
            f"disagreement is not rounding variability of one model alone. Retrain them with one nnunet_varaug "
            f"version")
