"""Stochastic rounding of PyTorch's floating-point results, per op or per instruction (a package).

Modules, one job each: :mod:`.rounding` (stochastic rounding of a high-precision result to its dtype),
:mod:`.ops` (which aten ops round), :mod:`.reductions` (convolutions, matrix products and sums, op- and
instruction-level), :mod:`.mode` (the ``MonteCarloArithmetic`` dispatch mode), :mod:`.precision` (the GPU
precision settings that training records). See docs/numerics.md for what each mode is and is not.
"""
from nnunet_varaug.training.numerics.mode import GRANULARITIES, INSTRUCTION_LEVEL_OPS, MonteCarloArithmetic
from nnunet_varaug.training.numerics.ops import NO_ROUNDING, is_perturbed
from nnunet_varaug.training.numerics.rounding import HIGH, PRECISION, PrecisionError, check_virtual_bits, stochastic_round

__all__ = ["GRANULARITIES", "HIGH", "INSTRUCTION_LEVEL_OPS", "MonteCarloArithmetic", "NO_ROUNDING", "PRECISION",
           "PrecisionError", "check_virtual_bits", "is_perturbed", "stochastic_round"]
