"""Counter-based noise (``nnunet_varaug.training.numerics.noise``): Philox4x32-10 against Random123's known-answer
vectors, keys without collisions over 10^6 (stream, epoch) pairs, the compiled kernels against the PyTorch
reference, and noise that depends on its address only (not on thread count, other ops' sizes or the seed's
fate at reseed)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nnunet_varaug.training.numerics import GENERATOR, MonteCarloArithmetic, generator_warning, kernels
from nnunet_varaug.training.numerics.noise import (STREAM_LIMIT, noise_identity, noise_key, philox4x32,
                                                   philox_words, splitmix64, splitmix64_array)
from nnunet_varaug.training.seeding import derive_seed

pytestmark = pytest.mark.unit

# Random123's examples/kat_vectors (copy in girving/random123-manual at 61e8479252c42f0f8c0490dec55237d7c01bf509):
# "philox4x32 10 CTR[4] KEY[2] EXPECTED[4]"
KAT = [
    ((0x00000001, 0x00000000, 0x00000000, 0x00000000), (0x00000001, 0x00000000),
     (0xac08141b, 0xdfc5ccbe, 0x79c07a47, 0xa7f66093)),
    ((0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344), (0x00000001, 0x00000000),
     (0x38527b8f, 0xfad9a48c, 0x20e675c0, 0xf2fea26a)),
    ((0x00000000, 0x00000000, 0x00000000, 0x80000000), (0x00000000, 0x80000000),
     (0xf7a0b371, 0xe51dc93d, 0x56ce135d, 0x1d4b5580)),
    ((0xa4093822, 0x299f31d0, 0x082efa98, 0xec4e6c89), (0x00000000, 0xffffffff),
     (0x9fcce05d, 0x837d3f3c, 0x5cdf3e61, 0xdb2544c0)),
]


@pytest.mark.parametrize("ctr, key, expected", KAT)
def test_philox_known_answers(ctr, key, expected):
    out = philox4x32(torch.tensor([ctr[0]]), ctr[1], ctr[2], ctr[3], *key)
    assert tuple(int(o) for o in out) == expected
    block = ctr[0] | (ctr[1] << 32)
    if kernels.library() is not None and block < 2 ** 62:  # compiled: counter (block lo, block hi, op, iteration)
        words = kernels.words(key, ctr[2], ctr[3], 0, 4 * block, 4, 1)
        assert tuple(words[:, 0].tolist()) == expected


def test_no_key_collision_over_a_million_stream_epoch_pairs():
    """1000 streams x 1000 epochs give 10^6 distinct 64-bit keys (SplitMix64 is a bijection, so none can
    collide); the 32-bit seeds used before collide within the same pairs (stream 50 epoch 83 and stream 79
    epoch 448 shared their noise)."""
    streams, epochs = np.meshgrid(np.arange(1000, dtype=np.uint64), np.arange(1000, dtype=np.uint64))
    keys = splitmix64_array((streams.ravel() << np.uint64(32)) | epochs.ravel())
    assert len(np.unique(keys)) == 10 ** 6
    for s, e in ((0, 0), (50, 83), (79, 448), (999, 999)):
        k0, k1 = noise_key(s, e)
        assert (k1 << 32) | k0 == int(keys[e * 1000 + s]) == splitmix64((s << 32) | e)
    assert noise_key(50, 83) != noise_key(79, 448)
    assert derive_seed("mca", 50, "epoch", 83) == derive_seed("mca", 79, "epoch", 448)  # the old collision
    assert noise_identity(3, seed=3) == STREAM_LIMIT + 3 != noise_identity(3)
    with pytest.raises(ValueError, match="seed=-1"):
        noise_identity(0, seed=-1)


@pytest.mark.parametrize("per", [1, 2])
def test_compiled_words_equal_the_reference(per):
    if kernels.library() is None:
        pytest.skip(kernels.status())
    key = noise_key(7, 11)
    for base in (0, 1, 6, 2 ** 34 + 3):
        assert torch.equal(kernels.words(key, 5, 9, 0, base, 777, per),
                           philox_words(key, 5, 9, base, 777, per, torch.device("cpu")))


def _two_ops(sizes, **kwargs):
    """Round a value 1 + 2^-25 in ops of the given sizes; return the last op's result."""
    mode = MonteCarloArithmetic(**kwargs)
    with mode:
        for n in sizes:
            out = torch.ones(n) + 2.0 ** -25
    return out


def test_noise_depends_on_its_address_only():
    """An op's noise does not depend on the sizes of the ops before it, and the words are uniform enough that a
    quarter-ulp excess rounds up about a quarter of the time."""
    a = _two_ops([10, 100_000], stream=4)
    b = _two_ops([99_999, 100_000], stream=4)
    assert torch.equal(a, b)
    up = (a == 1 + 2.0 ** -23).double().mean().item()
    assert abs(up - 0.25) <= 3.29 * (0.25 * 0.75 / 100_000) ** 0.5


def test_seed_is_kept_and_epochs_restart_the_counters():
    """seed= keys the noise instead of the stream and survives reseed(epoch); a reseeded mode draws what a fresh
    mode reseeded to the same epoch draws; different epochs and streams draw differently."""
    def draw(mode, epoch=None):
        if epoch is not None:
            mode.reseed(epoch)
        with mode:
            return torch.ones(50_000) + 2.0 ** -25

    seeded = MonteCarloArithmetic(stream=0, seed=5)
    first = draw(seeded)
    assert not torch.equal(first, draw(MonteCarloArithmetic(stream=0)))
    assert not torch.equal(first, draw(MonteCarloArithmetic(stream=5)))  # seeds and streams never share keys
    assert torch.equal(first, draw(MonteCarloArithmetic(stream=9, seed=5)))
    at_three = draw(seeded, epoch=3)
    assert torch.equal(at_three, draw(MonteCarloArithmetic(stream=1, seed=5), epoch=3))
    assert not torch.equal(at_three, draw(MonteCarloArithmetic(stream=0), epoch=3))
    assert not torch.equal(at_three, first)


def test_generator_recorded_and_compared():
    mode = MonteCarloArithmetic(stream=2)
    assert mode.generator == GENERATOR and GENERATOR["name"] == "philox4x32-10"
    same = {"a_mca0": GENERATOR, "a_mca1": dict(GENERATOR)}
    assert generator_warning(same) is None
    mixed = {**same, "a_mca2": {"name": "mt19937", "version": 0}, "a_mca3": None}
    warning = generator_warning(mixed)
    assert "a_mca2: mt19937 version 0" in warning and "a_mca3: no generator recorded" in warning
