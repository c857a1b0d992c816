"""Quantisation transforms (``quant: {weights: ..., activations: ...}`` blocks)."""

from sparsejax.transforms.quant.absmax_ste import AbsmaxSTE
from sparsejax.transforms.quant.common import Quantizer
from sparsejax.transforms.quant.dat import DAT
from sparsejax.transforms.quant.fp8 import FP8
from sparsejax.transforms.quant.lmul import LMulLinear
from sparsejax.transforms.quant.lsq import LSQ, UNIT_GAUSSIAN_ABS_MEAN

__all__ = ["DAT", "FP8", "LSQ", "UNIT_GAUSSIAN_ABS_MEAN", "AbsmaxSTE", "LMulLinear",
           "Quantizer"]
