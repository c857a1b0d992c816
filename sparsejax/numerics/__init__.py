"""Numerics from the literature, as pure JAX functions: L-Mul (multiplication by integer
addition) and 1-bit signed-cut matrix approximations."""

from sparsejax.numerics.lmul import lmul, lmul_matmul, lmul_offset_bits, round_mantissa
from sparsejax.numerics.signed_cuts import SignedCuts, signed_cut_width, signed_cuts

__all__ = ["SignedCuts", "lmul", "lmul_matmul", "lmul_offset_bits", "round_mantissa",
           "signed_cut_width", "signed_cuts"]
