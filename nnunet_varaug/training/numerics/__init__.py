"""Stochastic rounding of PyTorch's floating-point results, per op or per instruction (a package).

Modules, one job each: :mod:`.rounding` (rounding of a high-precision result with given random words),
:mod:`.noise` (the counter-based Philox noise, its key and counter), :mod:`.rounder` (the current op's roundings
and their addresses), :mod:`.kernels` and :mod:`.csource` (the compiled CPU kernels), :mod:`.lanes`
(per-instruction dot products and sums), :mod:`.conv` (convolutions), :mod:`.reductions` (per-instruction
normalisation, softmax, losses, norms), :mod:`.routes` (which ops take which route), :mod:`.dtypes` (result
dtypes and inputs), :mod:`.ops` (which aten ops round), :mod:`.mode` (the ``MonteCarloArithmetic`` dispatch
mode), :mod:`.precision` (the GPU precision settings that training records). See docs/numerics.md.
"""
from nnunet_varaug.training.numerics.mode import GRANULARITIES, MonteCarloArithmetic
from nnunet_varaug.training.numerics.noise import GENERATOR, generator_warning
from nnunet_varaug.training.numerics.ops import NO_ROUNDING, is_perturbed
from nnunet_varaug.training.numerics.rounding import (HIGH, PRECISION, PrecisionError, check_virtual_bits,
                                                      random_round, stochastic_round)
from nnunet_varaug.training.numerics.routes import INSTRUCTION_LEVEL_OPS

__all__ = ["GENERATOR", "GRANULARITIES", "HIGH", "INSTRUCTION_LEVEL_OPS", "MonteCarloArithmetic", "NO_ROUNDING",
           "PRECISION", "PrecisionError", "check_virtual_bits", "generator_warning", "is_perturbed",
           "random_round", "stochastic_round"]
