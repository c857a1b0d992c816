"""Quantisation transforms (``quant: {weights: ..., activations: ...}`` blocks)."""

from sparsejax.transforms.kinds import RuleBlock, declare_block
from sparsejax.transforms.quant.absmax_ste import AbsmaxSTE
from sparsejax.transforms.quant.common import Quantizer
from sparsejax.transforms.quant.dat import DAT
from sparsejax.transforms.quant.fp8 import FP8
from sparsejax.transforms.quant.lmul import LMulLinear
from sparsejax.transforms.quant.lsq import LSQ, UNIT_GAUSSIAN_ABS_MEAN

declare_block(RuleBlock(
    key="quant.activations", kind="quant", stage="act_quant", order=10, default_method="dat",
    layers={"linear": "activations"},
    log=("quant/{path}/activations", "quant/activations"),
    doc="quantisation of a linear layer's input"))
declare_block(RuleBlock(
    key="quant.weights", kind="quant", stage="weight_quant", order=30, default_method="dat",
    layers={"linear": "weights"}, log=("quant/{path}/weights", "quant/weights"),
    doc="quantisation of a linear layer's weight"))

__all__ = ["DAT", "FP8", "LSQ", "UNIT_GAUSSIAN_ABS_MEAN", "AbsmaxSTE", "LMulLinear",
           "Quantizer"]
